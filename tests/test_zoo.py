"""The model zoo (issue 13, item 6): tore_kernels.patch on the released networks as their own repositories build
them (tore_reference.released: images in, their own backbone, released attributes and return types).

For each network: patched outputs equal eager's, the state_dict is unchanged, gradients match a float64 copy of the
eager model (as closely as fp32 eager's do), unpatch is bit-exact, a call under inference_mode then autograd works
(eval and train), nn.DataParallel works, torch.compile(patch(model)) gives the same outputs; an unknown or nearly
right structure gets the clear ValueError and is left untouched. Tiny sizes (released.TINY_*), 56x56 images."""
import copy
import itertools

import pytest
import torch
from torch import nn

from tore_kernels.patch import patch, patch_report, unpatch
from tore_reference import released

B = 2
# fp32, as tests/test_patch.py: the same sums in other orders through ~10 residual blocks (~1e-6 on O(1) outputs)
TOL = dict(rtol=1e-4, atol=2e-5)


def tore_fastmetro(size="S", keep_ratio=0.8, arch="resnet50"):
    return lambda dropout: released.build_tore_fastmetro(tiny=True, model_name=f"FastMETRO_{size}",
                                                         keep_ratio=keep_ratio, arch=arch, transformer_dropout=dropout)


def fastmetro(hand):
    return lambda dropout: released.build_fastmetro(hand=hand, tiny=True, model_name="FastMETRO-S",
                                                    transformer_dropout=dropout)


def metro(tore):
    def build(dropout):
        config = released.BertConfig(intermediate_size=64, vocab_size=8, attention_probs_dropout_prob=dropout)
        return released.build_metro(tore=tore, tiny=True, base_config=config, drop_out=dropout,
                                    transformer_dropout_3=dropout)
    return build


# name -> builder(dropout). The S / M / L and keep-ratio / backbone grid only in the outputs test (it changes the
# layer count, the pruned token count and the feature path); the slower checks take one of each structure.
NETWORKS = {
    "tore_fastmetro": tore_fastmetro(),
    "tore_fastmetro_gtr": tore_fastmetro(keep_ratio=None),
    "fastmetro_body": fastmetro(hand=False),
    "fastmetro_hand": fastmetro(hand=True),
    "tore_metro": metro(tore=True),
    "metro": metro(tore=False),
}
GRID = {f"tore_fastmetro_{size}_{ratio}_{arch}": tore_fastmetro(size, ratio, arch)
        for size, ratio, arch in itertools.product("SML", (0.8, 0.5), ("resnet50", "efficientnet-b0"))}


def build(name, device, dropout=0.1, seed=0):
    torch.manual_seed(seed)
    model = released.nontrivial_norms((NETWORKS.get(name) or GRID[name])(dropout), seed=seed)
    if hasattr(model, "config"):  # METRO's constant inputs are made on config.device
        model.config.device = device
    return model.to(device).eval()


def flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    values = out.values() if isinstance(out, dict) else out
    return [t for v in values for t in flat(v)]


def run(model, images):
    """The released forward call of ``model`` -> its outputs as a flat list of tensors."""
    inner = model.module if isinstance(model, nn.DataParallel) else model
    if hasattr(inner, "trans_encoder"):
        device = images.device
        return flat(model(images, released.TemplateSMPL().to(device), released.mesh_sampler(), None, False))
    return flat(model(images))


@pytest.fixture(params=list(NETWORKS))
def name(request):
    if request.param == "fastmetro_hand":
        request.getfixturevalue("fastmetro_data")  # MANO needs FastMETRO's files
    return request.param


def images_on(device, batch=B):
    return released.example_images(batch, tiny=True).to(device)


def assert_all_close(got, ref, **tol):
    assert len(got) == len(ref)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g.shape == r.shape and g.dtype == r.dtype, f"output {i}"
        torch.testing.assert_close(g, r, **(tol or TOL), msg=lambda m: f"output {i}: {m}")


@pytest.mark.parametrize("grid", list(GRID))
def test_tore_fastmetro_grid_patched_outputs_equal_eager(grid, device):
    model = build(grid, device)
    images = images_on(device)
    with torch.no_grad():
        ref = run(model, images)
        assert_all_close(run(patch(model), images), ref)


def test_patched_equals_eager_state_dict_unchanged_unpatch_exact(name, device):
    model = build(name, device)
    images = images_on(device)
    modules = dict(model.named_modules())
    types = {n: type(m) for n, m in modules.items()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = run(model, images)
        assert patch(model) is model and patch_report(model) is not None
        got = run(model, images)
        assert_all_close(got, ref)
        assert model.state_dict().keys() == state.keys()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
        unpatch(model)
        back = run(model, images)
    assert all(model.get_submodule(n) is m for n, m in modules.items() if n)
    assert all(type(m) is types[n] for n, m in model.named_modules())
    assert patch_report(model) is None
    for i, (u, v) in enumerate(zip(back, ref)):
        assert torch.equal(u, v), f"output {i} after unpatch"


def _loss(outputs, weights):
    return sum((o * w.to(o.dtype)).sum() for o, w in zip(outputs, weights))


def _gradients(model, images, weights):
    x = images.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    _loss(run(model, x), weights).backward()
    grads = {"images": x.grad}
    grads.update({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    return grads


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_gradients_after_inference_mode_match_float64(name, mode, device):
    """Evaluate under inference_mode, then take gradients in eval (saliency maps, test-time optimisation) or train
    mode: what the patched model cached there must not be inference tensors, and its gradients must match a float64
    copy of the eager model as closely as fp32 eager's do (whose reductions over 6890 vertices lose ~1e-3 relative
    on some parameters)."""
    eager = build(name, device, dropout=0.0)
    exact = copy.deepcopy(eager).double()
    fast = patch(copy.deepcopy(eager))
    images = images_on(device)
    with torch.inference_mode():
        run(fast, images)
    for m in (eager, exact, fast):
        m.train(mode == "train")
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        weights = [torch.randn(o.shape, generator=g).to(device) for o in run(eager, images)]
    want = _gradients(exact, images.double(), weights)
    fp32 = _gradients(eager, images, weights)
    got = _gradients(fast, images, weights)
    assert got.keys() == want.keys() == fp32.keys()
    total = float(torch.sqrt(sum(w.double().square().sum() for w in want.values())))
    for key, w in want.items():
        error = float((got[key].double() - w).norm())
        eager_error = float((fp32[key].double() - w).norm())
        bound = 2 * eager_error + 1e-4 * float(w.norm()) + 1e-7 * total
        assert error <= bound, f"{key}: |patched - float64| {error:.3g} > {bound:.3g} (fp32 eager {eager_error:.3g})"


def test_data_parallel(name, device):
    model = build(name, device)
    images = images_on(device)
    with torch.no_grad():
        ref = run(model, images)
        wrapped = nn.DataParallel(model)
        assert patch(wrapped) is wrapped and patch_report(model) is not None
        assert_all_close(run(wrapped, images), ref)
    unpatch(wrapped)
    assert patch_report(model) is None


# Inductor compiles (C++ codegen) take tens of seconds per network on 2 cores: Inductor for one TORE and one BERT
# network (between them every patched layer kind: packed linears, fused ITP, mesh-mask and SDPA attention, batched
# sampler), Dynamo alone for the others (backend "eager": it still traces every op with fake tensors, so an op
# without a fake implementation fails there too).
INDUCTOR = ("tore_fastmetro", "metro")


def test_compile_of_patched_model(name, device):
    torch._dynamo.reset()  # a fresh cache: earlier tests' graphs must not make this one fall back to eager
    model = build(name, device)
    images, other = images_on(device), images_on(device) * 0.5
    with torch.no_grad():
        ref, ref_other = run(model, images), run(model, other)
        compiled = torch.compile(patch(model), backend="inductor" if name in INDUCTOR else "eager")
        assert_all_close(run(compiled, images), ref)
        assert_all_close(run(compiled, other), ref_other)


def _compiled_frames(name, device):
    """(frames Dynamo compiled for ``patch(network)`` in eval mode, with outputs equal to patch's; the count after a
    training-mode call too)."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    model = patch(build(name, device))
    images = images_on(device)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        ref = run(model, images)
        assert_all_close(run(compiled, images), ref)
    in_eval = counter.frame_count
    model.train()
    run(compiled, images)  # training: the released code, traced
    return in_eval, counter.frame_count


def test_compile_leaves_patched_eval_forwards_eager(device):
    """In eval mode compile runs patch's forwards as they are (their graph-broken compile was slower); in training
    it traces the released code they fall back to."""
    in_eval, after_train = _compiled_frames("tore_fastmetro", device)
    assert in_eval == 0  # the whole patched forward ran outside Dynamo
    assert after_train > 0


@pytest.mark.parametrize("gemm", ["onednn", "mkl"])
def test_compile_of_metro_families_eager_where_gemms_are_onednn(gemm, device, monkeypatch):
    """Where fp32 GEMMs run on oneDNN (not Intel's CPUs) compile leaves the METRO families' eval forward eager
    (compiled, it measured 0.5x patch on an AMD EPYC); on MKL it compiles it, with the same outputs."""
    from tore_kernels.patch.families import common
    monkeypatch.setattr(common, "fp32_gemm", lambda: (gemm, 2))
    in_eval, after_train = _compiled_frames("tore_metro", device)
    assert (in_eval == 0) == (gemm == "onednn")
    assert after_train > 0  # training: traced either way


def test_tore_metro_parts_patched_equal_eager(device):
    """TORE-METRO's parts on their own (the released forward needs CUDA and SMPL): trans_encoder,
    transformer_3 with the mask the model passes (attention_mask_3) and the learned upsampling."""
    eager = build("tore_metro", device)
    fast = patch(copy.deepcopy(eager))
    g = torch.Generator().manual_seed(1)
    features = torch.randn(B, 14, 2051, generator=g).to(device)
    joints = torch.randn(14, B, 32, generator=g).to(device)
    cam = torch.randn(1, B, 32, generator=g).to(device)
    vertices = torch.randn(431, B, 32, generator=g).to(device)
    pos = eager.position_encoding_3(B, 14, 1, device).flatten(2).permute(2, 0, 1)
    coarse = torch.randn(B, 3, 431, generator=g).to(device)
    def parts(model):
        mask = model.attention_mask_3.to(device)
        return (flat(model.trans_encoder(features)) + flat(model.transformer_3(joints, cam, vertices, pos, attention_mask=mask))
                + [model.upsampling2(model.upsampling(coarse))])

    with torch.no_grad():
        assert_all_close(parts(fast), parts(eager))


def test_metro_encoder_patched_equals_eager(device):
    # METRO's 445 tokens through its BERT stages, dense self-attention
    eager = build("metro", device)
    fast = patch(copy.deepcopy(eager))
    features = torch.randn(B, 445, 2051, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        assert_all_close(flat(fast.trans_encoder(features)), flat(eager.trans_encoder(features)))


def test_unknown_or_nearly_right_structure_raises_and_is_untouched(device):
    with pytest.raises(ValueError, match="Looked for"):
        patch(nn.Sequential(nn.Linear(2, 2)))
    # one released network with one part wrong: every check runs before any swap (backbone included)
    for name, spoil, where in (
            ("tore_fastmetro", lambda m: setattr(m.transformer_3.decoder.layers[0], "multihead_attn", nn.Identity()),
             "transformer_3.decoder.layers.0.multihead_attn"),
            ("tore_metro", lambda m: setattr(m.transformer_3.decoder.layers[0], "self_attn", nn.Identity()),
             "transformer_3.decoder.layers.0.self_attn"),
            ("fastmetro_body", lambda m: delattr(m, "mesh_sampler"), "mesh_sampler missing")):
        model = build(name, device)
        spoil(model)
        modules = dict(model.named_modules())
        types = {n: type(m) for n, m in modules.items()}
        with pytest.raises(ValueError, match=where):
            patch(model)
        assert patch_report(model) is None
        assert all(model.get_submodule(n) is m for n, m in modules.items() if n)
        assert all(type(m) is types[n] for n, m in model.named_modules()), name


def test_bert_gelu_recognised_by_its_values():
    """METRO's BERT intermediates get F.gelu only where their activation computes the erf GELU."""
    import sys

    import torch.nn.functional as F
    layers = sys.modules["tore_kernels.patch.layers"]
    assert layers.is_erf_gelu(released._gelu) and layers.is_erf_gelu(F.gelu)
    assert not layers.is_erf_gelu(lambda x: F.gelu(x, approximate="tanh"))
    assert not layers.is_erf_gelu(F.relu) and not layers.is_erf_gelu(lambda x: x.tolist())
    model = patch(build("metro", torch.device("cpu")))
    swapped = [row for row in patch_report(model).swapped if "F.gelu" in row[2]]
    assert swapped and all(row[0].endswith("intermediate") for row in swapped)
