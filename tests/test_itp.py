"""image_token_prune / ImageTokenPruner against tore_reference (tore-model.md section 1)."""
import pytest
import torch

import tore_reference
from tore_kernels.ops.kernel_config import KernelConfig
from tore_kernels.nn.itp import ImageTokenPruner
from tore_kernels.ops import itp
from tore_kernels.ops.itp import image_token_prune
from isa_clones import run_under_clone

# Kernels round the same intermediates to the input dtype that eager does (conv/GELU output, heatmap,
# pre-norm tokens); the result is compared with a float64 reference on the same rounded inputs. Every
# rounding is one unit roundoff u (fp32 6e-8, fp16 4.9e-4, bf16 3.9e-3), amplified by the LayerNorm's
# 1/std and by softmax's sensitivity to logit errors: the budget is ~20 u on O(1) outputs (fp32: fp32 sums
# over K = 9*C terms, 1e-4 leaves >10x headroom for C <= 256).
TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2),
       torch.bfloat16: (8e-2, 8e-2)}


def _params(C, N, seed=0):
    """A reference pruner with non-trivial parameters (random LayerNorm affine, biases, larger logits)."""
    torch.manual_seed(seed)
    ref = tore_reference.ImageTokenPruner(C, N)
    with torch.no_grad():
        ref.token_selector_fc.weight.mul_(4.0)
        ref.token_selector_fc.bias.normal_()
        ref.token_selector_conv2d.bias.normal_(std=0.1)
        ref.layer_norm.weight.normal_(1.0, 0.5)
        ref.layer_norm.bias.normal_(std=0.5)
    return ref


def _args(ref):
    return [ref.token_selector_conv2d.weight, ref.token_selector_conv2d.bias, ref.token_selector_fc.weight,
            ref.token_selector_fc.bias, ref.layer_norm.weight, ref.layer_norm.bias]


def _case(B, C, H, W, N, dtype, seed=0):
    ref = _params(C, N, seed).to(dtype)
    x = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    with torch.no_grad():
        expected = ref.double()(x.double())  # exact maths on the dtype-rounded inputs
    ref.to(dtype)
    return x, ref, expected


def _assert_close(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double().cpu(), expected, atol=atol, rtol=rtol)


def _check(B, C, H, W, N, dtype, seq_first=False, device="cpu"):
    """The op on ``device`` against the float64 reference computed on the CPU."""
    x, ref, (tokens_ref, heatmap_ref) = _case(B, C, H, W, N, dtype)
    x, ref = x.to(device), ref.to(device)
    with torch.no_grad():
        tokens, heatmap = image_token_prune(x, *_args(ref), eps=ref.layer_norm.eps, seq_first=seq_first)
    assert tokens.shape == ((N, B, C) if seq_first else (B, N, C)) and tokens.is_contiguous()
    assert heatmap.shape == (B, N, H * W)
    _assert_close(tokens.transpose(0, 1) if seq_first else tokens, tokens_ref, dtype)
    _assert_close(heatmap, heatmap_ref, dtype)
    # each cluster is a distribution over the H*W positions
    torch.testing.assert_close(heatmap.double().sum(-1).cpu(), torch.ones(B, N, dtype=torch.float64),
                               atol=TOL[dtype][0] * 4, rtol=0)


def _grads(x, ref, fn, seq_first=False, device="cpu"):
    """Gradients of x and the six parameters through both outputs (tokens and heatmap, as in training), computed
    on ``device`` and returned on the CPU."""
    leaves = [t.detach().to(device).requires_grad_() for t in [x, *_args(ref)]]
    tokens, heatmap = fn(*leaves)
    if seq_first:
        tokens = tokens.transpose(0, 1)
    g = torch.Generator().manual_seed(7)
    loss = (tokens * torch.randn(tokens.shape, generator=g, dtype=tokens.dtype).to(device)).sum() \
        + (heatmap * torch.randn(heatmap.shape, generator=g, dtype=heatmap.dtype).to(device)).sum() * 10
    return [grad.cpu() for grad in torch.autograd.grad(loss, leaves)]


def _reference_fn(ref):
    """tore_reference's eager ITP over explicit parameter tensors (so gradients reach the leaves)."""
    def fn(x, cw, cb, fw, fb, lw, lb):
        return tore_reference.itp.image_token_pruning(
            x, lambda t: torch.nn.functional.conv2d(t, cw, cb, padding=1),
            lambda t: torch.nn.functional.linear(t, fw, fb),
            lambda t: torch.nn.functional.layer_norm(t, tuple(lw.shape), lw, lb, ref.layer_norm.eps))
    return fn


# ----------------------------------------------------------------------------------------------
# CPU (default backend) and the reference backend
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,C,H,W,N", [(2, 32, 7, 7, 39), (3, 96, 5, 3, 15), (1, 256, 8, 8, 1),
                                       (2, 32, 14, 14, 196), (1, 8, 1, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_matches_reference(B, C, H, W, N, dtype):
    assert itp.backend.choose(itp.OP, "cpu") == "cpu"
    _check(B, C, H, W, N, dtype)


def test_cpu_fp16_and_seq_first():
    _check(2, 32, 7, 7, 39, torch.float16)
    _check(3, 64, 5, 3, 15, torch.float32, seq_first=True)


def _check_channels_last_and_strided(device):
    x, ref, (tokens_ref, heatmap_ref) = _case(2, 32, 5, 3, 7, torch.float32)
    x, ref = x.to(device), ref.to(device)
    args = _args(ref)
    args[2] = torch.stack([args[2], args[2]], 2).flatten(1)[:, ::2]  # a strided fc_weight
    assert not args[2].is_contiguous() and torch.equal(args[2], _args(ref)[2])
    with torch.no_grad():
        tokens, heatmap = image_token_prune(x.to(memory_format=torch.channels_last), *args)
    _assert_close(tokens, tokens_ref, torch.float32)
    _assert_close(heatmap, heatmap_ref, torch.float32)


def test_channels_last_and_strided_inputs(device):
    """The default backend of each device (cpu on CPU tensors, triton on CUDA tensors)."""
    _check_channels_last_and_strided(device)


def test_triton_channels_last_and_strided_inputs(triton_backend):
    _check_channels_last_and_strided(triton_backend)


def test_reference_backend(device, monkeypatch):
    monkeypatch.setenv("TORE_KERNELS_BACKEND", "reference")
    assert itp.backend.choose(itp.OP, device) == "reference"
    _check(2, 32, 5, 3, 15, torch.float32, device=device)
    _check(1, 32, 4, 4, 16, torch.float32, seq_first=True, device=device)


def test_cpu_gradcheck_float64():
    x, ref, _ = _case(2, 4, 2, 3, 4, torch.float64)
    leaves = [x.requires_grad_()] + [p.detach().clone().requires_grad_() for p in _args(ref)]
    assert torch.autograd.gradcheck(lambda *a: image_token_prune(*a), leaves, fast_mode=True)
    assert torch.autograd.gradcheck(lambda *a: image_token_prune(*a, seq_first=True)[0], leaves, fast_mode=True)


def test_cpu_grads_match_reference_float32():
    x, ref, _ = _case(3, 64, 7, 7, 39, torch.float32)
    ours = _grads(x, ref, lambda *a: image_token_prune(*a, eps=ref.layer_norm.eps))
    expected = _grads(x, ref, _reference_fn(ref))
    for a, e in zip(ours, expected):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# Triton: on CUDA tensors where there is a GPU, else interpreted on CPU tensors (small shapes: it is slow)
# ----------------------------------------------------------------------------------------------
COMPILED_ONLY = pytest.mark.skipif(itp.backend.triton_interpret(), reason="too slow for the Triton interpreter")


@pytest.mark.parametrize("B,C,H,W,N,dtype,seq_first", [
    (2, 32, 7, 7, 39, torch.float32, False),
    (3, 96, 5, 3, 15, torch.float32, True),     # odd C (not a multiple of 64), odd grid
    (1, 256, 7, 7, 1, torch.float32, False),    # N = 1, several output-channel blocks
    (1, 32, 8, 8, 64, torch.float16, False),    # N = H*W
    (2, 64, 4, 4, 16, torch.bfloat16, True),
    (1, 32, 14, 14, 100, torch.float32, False),  # several position blocks, BLOCK_N = 128
    (3, 20, 9, 11, 50, torch.float16, True),     # C not a multiple of 8, H*W = 99 (odd), N odd
    pytest.param(32, 512, 7, 7, 39, torch.float32, True, marks=COMPILED_ONLY),  # TORE-FastMETRO's shape
    pytest.param(32, 512, 7, 7, 39, torch.bfloat16, True, marks=COMPILED_ONLY),
    pytest.param(32, 512, 7, 7, 39, torch.float16, False, marks=COMPILED_ONLY),
])
def test_triton_matches_reference(triton_backend, B, C, H, W, N, dtype, seq_first):
    assert itp.backend.choose(itp.OP, triton_backend) == "triton"
    _check(B, C, H, W, N, dtype, seq_first, device=triton_backend)


@pytest.mark.parametrize("seq_first", [False, True])
def test_triton_grads_match_reference(triton_backend, seq_first):
    x, ref, _ = _case(2, 32, 5, 3, 15, torch.float32)
    ours = _grads(x, ref, lambda *a: image_token_prune(*a, eps=ref.layer_norm.eps, seq_first=seq_first),
                  seq_first, device=triton_backend)
    expected = _grads(x, ref, _reference_fn(ref))
    for a, e in zip(ours, expected):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


def test_triton_op_opcheck():
    pytest.importorskip("triton")
    x, ref, _ = _case(2, 32, 3, 4, 6, torch.float32)
    args = (x.requires_grad_(), *[p.detach().clone().requires_grad_() for p in _args(ref)], 1e-5, True)
    tests = ["test_schema", "test_autograd_registration", "test_faketensor"]
    if torch.cuda.is_available():  # AOT tracing runs the kernels on real tensors: not interpretable here
        tests.append("test_aot_dispatch_dynamic")
        args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.tore_kernels.image_token_prune_triton.default, args, test_utils=tests)


def test_triton_falls_back_beyond_its_grid(triton_backend):
    x, ref, (tokens_ref, heatmap_ref) = _case(1, 8, 17, 16, 3, torch.float32)  # H*W = 272 > 256
    x, ref = x.to(triton_backend), ref.to(triton_backend)
    with pytest.warns(RuntimeWarning, match="H\\*W = 272"):
        tokens, heatmap = image_token_prune(x, *_args(ref))
    _assert_close(tokens, tokens_ref, torch.float32)
    _assert_close(heatmap, heatmap_ref, torch.float32)


# ----------------------------------------------------------------------------------------------
# module
# ----------------------------------------------------------------------------------------------
def test_module_loads_reference_state_dict_and_matches(device):
    ref = _params(64, 24).eval()
    ours = ImageTokenPruner(64, 24, grid_size=(7, 7))
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 64, 7, 7)
    with torch.no_grad():
        expected = ref.double()(x.double())  # exact maths on the CPU, the module on ``device``
        ref.float()
        for a, e in zip(ours.to(device)(x.to(device)), expected):
            _assert_close(a, e, torch.float32)
        tokens_sf, _ = ImageTokenPruner.from_model(ref, seq_first=True).to(device)(x.to(device))
        _assert_close(tokens_sf.transpose(0, 1), expected[0], torch.float32)


def test_module_from_model_copies_and_trains():
    ref = _params(32, 12)
    ours = ImageTokenPruner.from_model(ref, grid_size=(4, 4))
    assert (ours.in_channels, ours.num_tokens, ours.grid_size) == (32, 12, (4, 4))
    for (name, a), (_, e) in zip(ours.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, e) and a.data_ptr() != e.data_ptr(), name
    x = torch.randn(2, 32, 4, 4)
    tokens, heatmap = ours(x)
    (tokens.square().mean() + heatmap.max()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters())


def test_module_validation():
    with pytest.raises(ValueError, match="num_tokens"):
        ImageTokenPruner(32, 50, grid_size=(7, 7))
    with pytest.raises(ValueError, match="in_channels"):
        ImageTokenPruner(30, 10)
    with pytest.raises(ValueError, match="grid_size"):
        ImageTokenPruner(32, 10, grid_size=(7,))
    m = ImageTokenPruner(32, 10, grid_size=(4, 4))
    with pytest.raises(ValueError, match=r"\[B, 32, 4, 4\]"):
        m(torch.randn(1, 32, 5, 4))
    with pytest.raises(ValueError, match=r"\[B, 32, 4, 4\]"):
        m(torch.randn(1, 16, 4, 4))
    with pytest.raises(TypeError, match="float64"):
        m(torch.randn(1, 32, 4, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="missing token_selector_conv2d, token_selector_fc, layer_norm"):
        ImageTokenPruner.from_model(torch.nn.Module())


# ----------------------------------------------------------------------------------------------
# op validation
# ----------------------------------------------------------------------------------------------
def test_op_validation():
    x, ref, _ = _case(1, 32, 4, 4, 10, torch.float32)
    args = _args(ref)
    with pytest.raises(ValueError, match="features must be"):
        image_token_prune(x[0], *args)
    with pytest.raises(ValueError, match="multiple of 4"):
        image_token_prune(torch.randn(1, 30, 4, 4), *args)
    with pytest.raises(ValueError, match=r"conv_weight must have shape \(8, 32, 3, 3\)"):
        image_token_prune(x, args[0][:, :, :1], *args[1:])
    with pytest.raises(ValueError, match=r"ln_weight must have shape \(10, 32\)"):
        image_token_prune(x, *args[:4], args[4][:5], args[5])
    with pytest.raises(ValueError, match=r"N \(fc_weight rows\) must be in \[1, H\*W=4\]"):
        image_token_prune(x[:, :, :2, :2], *args)
    with pytest.raises(TypeError, match="fc_bias has dtype torch.float64"):
        image_token_prune(x, *args[:3], args[3].double(), *args[4:])
    with pytest.raises(TypeError, match="features must be float32"):
        image_token_prune(x.to(torch.int32), *args)
    with pytest.raises(TypeError, match="ln_bias must be a torch.Tensor"):
        image_token_prune(x, *args[:5], None)
    with pytest.raises(ValueError, match="conv_bias is on meta"):
        image_token_prune(x, args[0], args[1].to("meta"), *args[2:])
    with pytest.raises(ValueError, match="eps must be"):
        image_token_prune(x, *args, eps=0.0)


# ----------------------------------------------------------------------------------------------
# the configurations reported for the AOT compile check
# ----------------------------------------------------------------------------------------------
def test_gpu_report_configs_cover_every_launch():
    configs = itp.gpu_report_configs()
    assert configs and all(isinstance(c, KernelConfig) for c in configs)
    assert len({c.name for c in configs}) == len(configs)
    for c in configs:
        assert {k for k, v in c.signature.items() if v == "constexpr"} == set(c.constexprs), c.name
        assert c.flops > 0 and 0 < c.bytes_fused
    # what the launcher picks for every supported (H*W, N) is a reported configuration
    reported = {(c.kernel, tuple(sorted(c.constexprs.items())), c.num_warps, c.num_stages) for c in configs}
    for hw in (1, 15, 49, 64, 144, 196, 256):
        for n in {1, hw // 2 + 1, hw}:
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                for kernel, cfg in ((itp._itp_logits_kernel, itp._logits_config(hw, n, dtype)),
                                    (itp._itp_project_norm_kernel, itp._project_config(hw, dtype))):
                    consts = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
                    consts["IEEE"] = dtype == torch.float32  # on a GPU: only fp32 takes the exact-fp32 dot
                    key = (kernel, tuple(sorted(consts.items())), cfg["num_warps"], cfg["num_stages"])
                    assert key in reported, (hw, n, dtype, cfg)
    # kernel 1 keeps the GELU activations out of global memory: fewer bytes than the eager ops it replaces
    assert all(c.bytes_fused < c.bytes_eager for c in configs if c.kernel is itp._itp_logits_kernel)


# ----------------------------------------------------------------------------------------------
# the C++ post-conv op behind the CPU path
# ----------------------------------------------------------------------------------------------
def _post_conv_args(B, C, H, W, N, dtype):
    x, ref, _ = _case(B, C, H, W, N, dtype)
    cw, cb, *rest = _args(ref)
    return [torch.nn.functional.conv2d(x, cw, cb, padding=1), x, *rest]


@pytest.mark.skipif(not itp.HAS_POST_CONV_OP, reason="tore_kernels._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("seq_first", [False, True])
def test_post_conv_opcheck(dtype, seq_first):
    args = _post_conv_args(2, 20, 3, 5, 7, dtype)  # C % 8 != 0 and odd H*W exercise the kernel's edge tiles
    if dtype == torch.float64:
        args = [t.requires_grad_() for t in args]
    torch.library.opcheck(torch.ops.tore_kernels.image_token_prune_post_conv, (*args, 1e-5, seq_first))


POST_CONV_SHAPES = [(3, 512, 7, 7, 39, torch.float32), (2, 40, 14, 14, 196, torch.float32),
                    (2, 36, 9, 9, 50, torch.float32), (2, 64, 5, 5, 20, torch.float32), (2, 20, 3, 5, 7, torch.float32),
                    (2, 20, 3, 5, 7, torch.float16)]


@pytest.mark.skipif(not itp.HAS_POST_CONV_OP, reason="tore_kernels._C not built")
@pytest.mark.parametrize("B,C,H,W,N,dtype", POST_CONV_SHAPES)
def test_post_conv_op_values(B, C, H, W, N, dtype):
    """The C++ op itself (whichever clone this process runs) at the production shape and the kernel's edge tiles
    (C % 8 != 0, N = H*W, every narrower tile width and shorter tile height of its GEMMs) against tore_reference."""
    x, ref, (tokens_ref, heatmap_ref) = _case(B, C, H, W, N, dtype)
    cw, cb, *rest = _args(ref)
    with torch.no_grad():
        for seq_first in (False, True):
            tokens, heatmap = torch.ops.tore_kernels.image_token_prune_post_conv(
                torch.nn.functional.conv2d(x, cw, cb, padding=1), x, *rest, ref.layer_norm.eps, seq_first)
            _assert_close(tokens.transpose(0, 1) if seq_first else tokens, tokens_ref, dtype)
            _assert_close(heatmap, heatmap_ref, dtype)


@pytest.mark.parametrize("B,C,H,W,N,dtype", POST_CONV_SHAPES[:1] + POST_CONV_SHAPES[-1:])
def test_cpu_path_runs_post_conv_op_where_a_clone_does(B, C, H, W, N, dtype):
    """The cpu implementation runs the C++ op where the kernels run an AVX2 or AVX-512 clone and torch's ops
    elsewhere (the baseline build is the slower one there); the values match tore_reference either way."""
    assert itp.backend.choose(itp.OP, "cpu") == "cpu"
    assert itp.uses_post_conv_op() == (itp.HAS_POST_CONV_OP and itp.backend.cpu_isa() in ("avx2", "avx512"))
    with torch.profiler.profile() as prof:
        _check(B, C, H, W, N, dtype)
    ran = any(e.key == "tore_kernels::image_token_prune_post_conv" for e in prof.key_averages())
    assert ran == itp.uses_post_conv_op()


@pytest.mark.skipif(not itp.HAS_POST_CONV_OP, reason="tore_kernels._C not built")
@pytest.mark.parametrize("clone", itp.backend.ISA_CLONES)
def test_post_conv_op_every_isa_clone(clone):
    """The C++ op compiles its sample function for the baseline ISA, AVX2 and AVX-512VL and runs the widest that
    the CPU and ATEN_CPU_CAPABILITY allow (read once per process): rerun its value tests and the path choice
    under each clone this CPU can execute."""
    run_under_clone(clone, __file__, "test_post_conv_op_values or test_cpu_path_runs_post_conv_op_where_a_clone_does",
                    expect_passed=len(POST_CONV_SHAPES) + 2)
