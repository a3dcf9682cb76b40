"""Property tests (hypothesis) of every op against tore_reference (or a float64 dense softmax for attention).

Shapes (odd and empty included), dtypes, strides (transposed and strided views), masks / graphs and values
(NaN, inf, points far outside the image) are drawn at random. Tolerances are error bounds derived per case
(comments at each) from the unit roundoff ``u`` of the dtype the kernels compute in, never fixed constants
tuned until green. Profiles (tests/conftest.py): a derandomized CI run, ``TORE_FUZZ_EXAMPLES=2000`` for a
long random one.
"""
import contextlib
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tore_reference
from tore_kernels import backend
from tore_kernels.ops import (adjacency_attention, image_token_prune, itp_loss, mesh_upsample, neighbour_table,
                              token_occupancy, weak_perspective_project)

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Slow examples (Triton interpreted on CPU): a fifth of the profile's examples.
FEW = settings(max_examples=max(4, settings.default.max_examples // 5))
# The device whose tensors the Triton kernels take in this run (tests/conftest.py): CPU ones through the
# interpreter where there is no GPU, CUDA ones where there is.
TRITON_DEVICE = torch.device("cpu" if backend.triton_interpret() else "cuda")


def on_triton_device(*tensors):
    """``tensors`` on TRITON_DEVICE with their strides kept (views with gaps too); skips where Triton cannot run."""
    if not backend.has_triton() or (TRITON_DEVICE.type == "cuda" and not torch.cuda.is_available()):
        pytest.skip(f"triton cannot run here (on {TRITON_DEVICE.type} tensors in this run)")
    if TRITON_DEVICE.type == "cpu":
        return tensors
    return tuple(torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=TRITON_DEVICE).copy_(t)
                 for t in tensors)


def unit(dtype):
    return torch.finfo(dtype).eps / 2


def acc_unit(dtype):
    """Unit roundoff of the type the CPU kernels compute in (float for the half types)."""
    return unit(torch.float64 if dtype == torch.float64 else torch.float32)


@contextlib.contextmanager
def forced(impl):
    """TORE_KERNELS_BACKEND=impl for the block (hypothesis cannot reuse function-scoped monkeypatch)."""
    old = os.environ.get(backend.ENV_VAR)
    os.environ[backend.ENV_VAR] = impl
    try:
        yield
    finally:
        if old is None:
            del os.environ[backend.ENV_VAR]
        else:
            os.environ[backend.ENV_VAR] = old


def cpu_impls(op):
    """The implementations of ``op`` that can run on CPU tensors here (reference always)."""
    return [i for i in ("cpu", "reference") if backend._why_not(op, i, torch.device("cpu")) is None]


LAYOUTS = ("contiguous", "reversed", "strided")


def relayout(t, layout):
    """The same values with other strides: every dim reversed in memory, or every other element of a buffer."""
    if layout == "reversed" and t.dim() > 1:
        order = tuple(reversed(range(t.dim())))
        return t.permute(order).contiguous().permute(order)
    if layout == "strided" and t.dim() > 0:
        buf = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
        buf[..., ::2] = t
        return buf[..., ::2]
    return t.contiguous()


def values(shape, dtype, seed, scale=1.0, special=0.0, low=None, high=None):
    """randn * scale (or uniform in [low, high)) in float64, then a fraction ``special`` of NaN / +-inf, cast."""
    g = torch.Generator().manual_seed(seed)
    if low is None:
        x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    else:
        x = torch.rand(shape, generator=g, dtype=torch.float64) * (high - low) + low
    if special:
        pick = torch.rand(shape, generator=g, dtype=torch.float64) < special
        kind = torch.randint(0, 3, shape, generator=g)
        specials = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64)[kind]
        x = torch.where(pick, specials, x)
    return x.to(dtype)


def assert_within(actual, expected, bound, what):
    """NaN exactly where expected is NaN, infinities equal, finite elements within ``bound`` (all float64)."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan), f"{what}: NaN pattern differs from the reference"
    inf = expected.isinf()
    assert torch.equal(actual[inf], expected[inf]) and not actual[~inf & ~nan].isinf().any(), \
        f"{what}: infinities differ from the reference"
    finite = ~inf & ~nan
    err = (actual - expected).abs()[finite]
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(expected)[finite]
    bad = ~(err <= bound)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {err.numel()} elements beyond the error bound; "
                           f"worst {err[bad].max().item():.3g} vs bound {bound[bad].min().item():.3g}")


# -------------------------------------------------------------------------------------------------------------
# weak_perspective_project

@given(lead=st.lists(st.integers(0, 4), max_size=2), P=st.integers(0, 33), dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(LAYOUTS), broadcast_camera=st.booleans(), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([1e-3, 1.0, 30.0]), special=st.sampled_from([0.0, 0.1]),
       impl=st.sampled_from(cpu_impls("weak_perspective_project")))
def test_project(lead, P, dtype, layout, broadcast_camera, seed, scale, special, impl):
    lead = tuple(lead)
    points = relayout(values((*lead, P, 3), dtype, seed, scale, special), layout)
    camera = values((*lead, 3), dtype, seed + 1, 1.0, special)
    if broadcast_camera and lead:  # stride-0 rows: one camera viewed B times
        camera = camera.reshape(-1, 3)[:1].expand(*lead, 3) if math.prod(lead) else camera
    with forced(impl):
        out = weak_perspective_project(points, camera)
    assert out.shape == (*lead, P, 2) and out.dtype == dtype
    n = math.prod(lead)
    if n == 0:
        return  # the reference cannot reshape an empty batch; the shape is all there is
    expected = tore_reference.orthographic_projection(points.reshape(n, P, 3), camera.reshape(n, 3))
    expected = expected.reshape(*lead, P, 2)
    if dtype in (torch.float32, torch.float64):
        # The same two operations (add, then multiply) in the same type as the reference: bit-identical.
        torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    else:
        # Half types: the kernel rounds s * (x + t) once from float, the reference twice in the dtype, so
        # both are within (2u + u^2) |exact| of the exact value: 3u |exact| apart (+ subnormal spacing).
        # |values| <= ~30 * 6 keeps s * (x + t) far from float16's overflow: infinities come from the inputs.
        x, c = points.double(), camera.double().unsqueeze(-2)
        exact = c[..., :1] * (x[..., :2] + c[..., 1:])
        tiny = torch.finfo(dtype).tiny * torch.finfo(dtype).eps
        assert_within(out, expected, 3.01 * unit(dtype) * exact.abs() + 2 * tiny, "projection")


@given(B=st.integers(1, 3), P=st.integers(0, 9), seed=st.integers(0, 2**31 - 1),
       impl=st.sampled_from(cpu_impls("weak_perspective_project")))
def test_project_gradients(B, P, seed, impl):
    points = values((B, P, 3), torch.float64, seed).requires_grad_(True)
    camera = values((B, 3), torch.float64, seed + 1).requires_grad_(True)
    grad = values((B, P, 2), torch.float64, seed + 2)
    with forced(impl):
        got = torch.autograd.grad(weak_perspective_project(points, camera), (points, camera), grad)
    want = torch.autograd.grad(tore_reference.orthographic_projection(points, camera), (points, camera), grad)
    # float64, sums over P <= 9 terms of size |g| |x + t| = O(10) in another order: 1e-12 is 100x that error.
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# -------------------------------------------------------------------------------------------------------------
# token_occupancy

def occupancy_points(B, P, grid, dtype, seed, far):
    """Points in and around [-1, 1], exact cell borders 2k/G - 1, far outside (up to half the dtype's max),
    NaN and +-inf, in any mix."""
    g = torch.Generator().manual_seed(seed)
    kind = torch.randint(0, 5, (B, P, 2), generator=g)
    uniform = torch.rand(B, P, 2, generator=g, dtype=torch.float64) * 3 - 1.5
    G = torch.tensor(grid[::-1], dtype=torch.float64)  # x against grid_w, y against grid_h
    border = 2 * torch.floor(torch.rand(B, P, 2, generator=g, dtype=torch.float64) * (G + 1)) / G - 1
    huge = (torch.rand(B, P, 2, generator=g, dtype=torch.float64) * 2 - 1) * far
    special = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64)[torch.randint(0, 3, (B, P, 2),
                                                                                                 generator=g)]
    pts = torch.stack([uniform, border, huge, special, uniform], dim=-1).gather(-1, kind[..., None])[..., 0]
    return pts.to(dtype)


@given(B=st.integers(0, 4), P=st.integers(0, 40), grid=st.tuples(st.integers(1, 9), st.integers(1, 9)),
       dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**31 - 1),
       impl=st.sampled_from(cpu_impls("token_occupancy")))
def test_token_occupancy(B, P, grid, dtype, layout, seed, impl):
    far = torch.finfo(dtype).max / 2
    pts = relayout(occupancy_points(B, P, grid, dtype, seed, far), layout)
    with forced(impl):
        out = token_occupancy(pts, grid)
    # Each step is rounded in the points' dtype by both: the cells must be identical, border points included.
    expected = tore_reference.token_occupancy(pts, grid)
    assert out.dtype == dtype and not out.requires_grad
    assert torch.equal(out, expected)


# -------------------------------------------------------------------------------------------------------------
# itp_loss

@given(B=st.integers(0, 4), N=st.integers(1, 4), grid=st.tuples(st.integers(1, 7), st.integers(1, 7)),
       P=st.integers(0, 12), dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS),
       seed=st.integers(0, 2**31 - 1), ties=st.booleans(), special=st.sampled_from([0.0, 0.05]),
       smpl_dtype=st.sampled_from([torch.bool, torch.int64, torch.float32]))
def test_itp_loss(B, N, grid, P, dtype, layout, seed, ties, special, smpl_dtype):
    HW = grid[0] * grid[1]
    # |heatmap| well inside the dtype's range (max - min must not overflow in the type the op computes in)
    heatmap = values((B, N, HW), dtype, seed, 10.0, special)
    if ties:  # few distinct values: ties at the min and max of a row
        heatmap = heatmap.double().clamp(-1, 1).round().to(dtype)
    heatmap = relayout(heatmap, layout)
    points = occupancy_points(B, P, grid, dtype, seed + 1, 10.0)
    has_smpl = torch.randint(0, 2, (B,), generator=torch.Generator().manual_seed(seed)).to(smpl_dtype)
    out = itp_loss(heatmap, points, has_smpl, grid)
    assert out.shape == () and out.dtype == dtype
    # The reference in float64 on the same (exactly representable) inputs. Each term (x - min) / (max - min
    # + eps) * free carries <= 4 roundings of the op's compute type, the sum of n terms n - 1 more, all terms
    # are >= 0: relative error <= (n + 4) u_acc, then the cast to the dtype adds u_dtype.
    expected = tore_reference.itp_loss(heatmap.double(), points, has_smpl, grid)
    n = max(B * N * HW, 1)
    assert_within(out, expected, ((n + 4) * acc_unit(dtype) + unit(dtype)) * expected.abs(), "itp_loss")


@given(B=st.integers(1, 3), N=st.integers(1, 3), grid=st.tuples(st.integers(1, 5), st.integers(1, 5)),
       seed=st.integers(0, 2**31 - 1), ties=st.booleans())
def test_itp_loss_gradient(B, N, grid, seed, ties):
    HW = grid[0] * grid[1]
    heatmap = values((B, N, HW), torch.float64, seed)
    if ties:  # min and max ties: their gradient is shared evenly, as the reference's min() / max()
        heatmap = heatmap.clamp(-1, 1).round()
    points = occupancy_points(B, 6, grid, torch.float64, seed + 1, 10.0)
    has_smpl = torch.randint(0, 2, (B,), generator=torch.Generator().manual_seed(seed))
    got = torch.autograd.grad(itp_loss(heatmap.requires_grad_(True), points, has_smpl, grid), heatmap)[0]
    want = torch.autograd.grad(tore_reference.itp_loss(heatmap, points, has_smpl, grid), heatmap)[0]
    # float64; each element of the gradient sums <= HW terms of size <= 1 / (max - min + eps) that may cancel
    # to ~0: the bound is 16 HW u per unit of the largest term.
    term = 1 / (heatmap.detach().amax(-1) - heatmap.detach().amin(-1) + 1e-12)
    torch.testing.assert_close(got, want, rtol=0, atol=16 * HW * unit(torch.float64) * float(term.max()))


# -------------------------------------------------------------------------------------------------------------
# image_token_prune

def itp_case(B, C, H, W, N, dtype, seed, layout):
    torch.manual_seed(seed)
    ref = tore_reference.ImageTokenPruner(C, N).double()
    with torch.no_grad():  # affine LayerNorm parameters other than the identity
        ref.layer_norm.weight.uniform_(0.5, 1.5)
        ref.layer_norm.bias.uniform_(-0.5, 0.5)
    features = torch.randn(B, C, H, W, dtype=torch.float64)
    params = [p.detach() for p in (ref.token_selector_conv2d.weight, ref.token_selector_conv2d.bias,
                                   ref.token_selector_fc.weight, ref.token_selector_fc.bias,
                                   ref.layer_norm.weight, ref.layer_norm.bias)]
    return ref, relayout(features.to(dtype), layout), [p.to(dtype) for p in params]


def assert_itp_close(tokens, heatmap, ref, features, dtype, seq_first):
    """Against the float64 reference on the same inputs. The kernels sum K <= 9C + HW terms per output in
    their compute type; the LayerNorm divides the token error by the tokens' std, so the token bound is
    scaled by max|tokens| / std (per sample) and the LayerNorm weight."""
    with torch.no_grad():
        exp_tokens, exp_heatmap = ref(features.double())
    B, C, H, W = features.shape
    N = exp_heatmap.shape[1]
    raw = exp_heatmap @ features.double().flatten(2).transpose(1, 2)  # the tokens before the LayerNorm
    amp = raw.abs().amax((1, 2)) / raw.std((1, 2), unbiased=False).clamp_min(1e-300)
    u = acc_unit(dtype)
    K = 9 * C + H * W + N
    if seq_first:
        tokens = tokens.transpose(0, 1)
    assert tokens.shape == (B, N, C) and heatmap.shape == (B, N, H * W)
    assert tokens.dtype == dtype and heatmap.dtype == dtype
    wmax = float(ref.layer_norm.weight.detach().abs().max())
    tok_bound = 4 * K * u * (1 + amp[:, None, None]) * wmax + 2 * unit(dtype) * exp_tokens.abs()
    assert_within(tokens, exp_tokens, tok_bound, "tokens")
    # softmax: each probability's relative error is about the absolute error of its logit (K u |logit terms|)
    assert_within(heatmap, exp_heatmap, 4 * K * u * exp_heatmap + 2 * unit(dtype) * exp_heatmap + 1e-3 * u,
                  "heatmap")


@given(B=st.integers(1, 3), C=st.sampled_from([4, 8, 12, 20]), H=st.integers(1, 6), W=st.integers(1, 6),
       n_frac=st.floats(0, 1), dtype=st.sampled_from([torch.float32, torch.float64]),
       layout=st.sampled_from(LAYOUTS), seq_first=st.booleans(), seed=st.integers(0, 2**31 - 1),
       impl=st.sampled_from(["cpu", "reference"]))
def test_image_token_prune(B, C, H, W, n_frac, dtype, layout, seq_first, seed, impl):
    N = 1 + int(n_frac * (H * W - 1))
    ref, features, params = itp_case(B, C, H, W, N, dtype, seed, layout)
    with forced(impl):
        tokens, heatmap = image_token_prune(features, *params, eps=1e-5, seq_first=seq_first)
    assert_itp_close(tokens, heatmap, ref, features, dtype, seq_first)


@FEW
@given(B=st.integers(1, 2), C=st.sampled_from([4, 12, 36]), H=st.integers(1, 5), W=st.integers(1, 5),
       n_frac=st.floats(0, 1), layout=st.sampled_from(LAYOUTS), seq_first=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_image_token_prune_triton(B, C, H, W, n_frac, layout, seq_first, seed):
    N = 1 + int(n_frac * (H * W - 1))
    ref, features, params = itp_case(B, C, H, W, N, torch.float32, seed, layout)
    with forced("triton"):
        tokens, heatmap = image_token_prune(*on_triton_device(features, *params), eps=1e-5, seq_first=seq_first)
    assert_itp_close(tokens.cpu(), heatmap.cpu(), ref, features, torch.float32, seq_first)


# -------------------------------------------------------------------------------------------------------------
# adjacency_attention (through neighbour_table)

@st.composite
def graphs(draw, max_n=90):
    """An allowed [L, S] bool matrix: symmetric graphs with self-loops (sparse, degree-1 rows, hubs that become
    dense rows, disconnected components, joint-like columns open to every row) or rectangular random masks."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["sparse", "self_only", "components", "hubs", "joints", "rectangular"]))
    n = draw(st.integers(1, max_n))
    if kind == "rectangular":
        L, S = n, draw(st.integers(1, max_n))
        allowed = torch.rand(L, S, generator=g) < draw(st.floats(0.0, 0.6))
        allowed[torch.arange(L), torch.randint(0, S, (L,), generator=g)] = True  # every row sees a key
        return allowed
    p = draw(st.floats(0.0, 0.2))
    a = torch.rand(n, n, generator=g) < p
    if kind == "self_only":
        a[:] = False
    elif kind == "components":  # block diagonal: no edge between the parts
        cut = torch.sort(torch.randint(0, n + 1, (3,), generator=g)).values.tolist()
        part = torch.bucketize(torch.arange(n), torch.tensor(cut), right=True)
        a &= part[:, None] == part[None, :]
    elif kind == "hubs":  # a few rows connected to (almost) everything: dense rows
        hubs = torch.randint(0, n, (draw(st.integers(1, 3)),), generator=g)
        a[hubs] = torch.rand(len(hubs), n, generator=g) < 0.9
    allowed = a | a.T | torch.eye(n, dtype=torch.bool)
    if kind == "joints":  # the first J columns open to every row (FastMETRO's joint tokens)
        allowed[:, : draw(st.integers(1, min(n, 14)))] = True
    return allowed


def dense_attention64(q, k, v, allowed, scale):
    scores = (q.double() @ k.double().transpose(-2, -1)) * scale
    return scores.masked_fill(~allowed, -math.inf).softmax(-1) @ v.double()


def attention_bound(q, k, v, scale, dtype, out_ref, impl, table):
    """|out - exact|: the scores' absolute error d * u * scale * max|q| max|k| (+ u for exp and the sums)
    moves each probability by about twice that relatively; the output is a convex mix of v rows. u is the
    compute type's: float for the kernels' half types, the dtype itself where eager SDPA runs (the reference
    backend, and the table's dense rows: it rounds its intermediates in float16 / bfloat16)."""
    d = q.shape[-1]
    qmax, kmax, vmax = (float(t.double().abs().max()) if t.numel() else 0.0 for t in (q, k, v))
    u = torch.full((q.shape[2], 1), acc_unit(dtype), dtype=torch.float64)
    u[table.dense_rows if impl != "reference" else slice(None)] = unit(dtype)
    return 8 * u * (d * scale * qmax * kmax + 4) * vmax + 2 * unit(dtype) * out_ref.abs()


def qkv(B, H, L, S, d, dtype, seed, layout):
    """q [B, H, L, d], k / v [B, H, S, d] as permuted views of [B, L, H, d] (a projection's output) or relaid."""
    q, k, v = (values(shape, torch.float64, seed + i).to(dtype) for i, shape in
               enumerate(((B, L, H, d), (B, S, H, d), (B, S, H, d))))
    q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
    return tuple(relayout(t, layout) if layout != "contiguous" else t for t in (q, k, v))


@given(allowed=graphs(), B=st.integers(0, 3), H=st.integers(1, 3), d=st.integers(1, 17),
       dtype=st.sampled_from(DTYPES), layout=st.sampled_from(["projection"] + list(LAYOUTS)),
       as_float=st.booleans(), dense_row_degree=st.sampled_from([None, 1, 3, 8]), seed=st.integers(0, 2**31 - 1),
       impl=st.sampled_from(cpu_impls("adjacency_attention")))
def test_adjacency_attention(allowed, B, H, d, dtype, layout, as_float, dense_row_degree, seed, impl):
    L, S = allowed.shape
    mask = torch.zeros(L, S, dtype=dtype).masked_fill(~allowed, -math.inf) if as_float else ~allowed
    table = neighbour_table(mask, dense_row_degree=dense_row_degree)
    assert torch.equal(table.allowed(), allowed)
    q, k, v = qkv(B, H, L, S, d, dtype, seed, layout)
    scale = 1 / math.sqrt(d)
    with forced(impl):
        out = adjacency_attention(q, k, v, table)
    expected = dense_attention64(q, k, v, allowed, scale)
    assert out.shape == (B, H, L, d) and out.dtype == dtype
    assert_within(out, expected, attention_bound(q, k, v, scale, dtype, expected, impl, table), "attention")


@given(allowed=graphs(), B=st.integers(1, 2), H=st.integers(1, 2), d=st.integers(1, 9),
       dense_row_degree=st.sampled_from([None, 2]), seed=st.integers(0, 2**31 - 1),
       impl=st.sampled_from(cpu_impls("adjacency_attention")))
def test_adjacency_attention_gradients(allowed, B, H, d, dense_row_degree, seed, impl):
    L, S = allowed.shape
    table = neighbour_table(~allowed, dense_row_degree=dense_row_degree)
    q, k, v = (t.detach().requires_grad_(True) for t in qkv(B, H, L, S, d, torch.float64, seed, "projection"))
    grad = values((B, H, L, d), torch.float64, seed + 7)
    with forced(impl):
        got = torch.autograd.grad(adjacency_attention(q, k, v, table), (q, k, v), grad)
    want = torch.autograd.grad(dense_attention64(q, k, v, allowed, 1 / math.sqrt(d)), (q, k, v), grad)
    # float64: sums of <= S products of O(10) values in another order, amplified by <= d * scale * |q||k|.
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * (1 + float(b.abs().max())), msg=f"d{name}")


def neighbour_attention64(q, k, v, allowed, scale):
    """Each row over its allowed keys only, in float64: blocked keys never enter a sum (no 0 * NaN), so a NaN
    or inf reaches exactly the rows that see it (the dense eager reference spreads a NaN in v to every row)."""
    scores = (q.double().unsqueeze(-2) * k.double().unsqueeze(-3)).sum(-1) * scale  # [B, H, L, S]
    p = scores.masked_fill(~allowed, -math.inf).softmax(-1)
    terms = torch.where(allowed[..., None], p.unsqueeze(-1) * v.double().unsqueeze(-3), 0.0)
    return terms.sum(-2)


@given(allowed=graphs(max_n=40), B=st.integers(1, 2), H=st.integers(1, 2), d=st.integers(1, 9),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**31 - 1))
def test_adjacency_attention_nan(allowed, B, H, d, dtype, seed):
    if "cpu" not in cpu_impls("adjacency_attention"):
        pytest.skip("tore_kernels._C is not built")
    L, S = allowed.shape
    table = neighbour_table(~allowed, dense_row_degree=S)  # every row through the kernel (none dense)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (values(shape, dtype, seed + i).masked_fill(torch.rand(shape, generator=g) < 0.03, math.nan)
               for i, shape in enumerate(((B, H, L, d), (B, H, S, d), (B, H, S, d))))
    with forced("cpu"):
        out = adjacency_attention(q, k, v, table)
    expected = neighbour_attention64(q, k, v, allowed, 1 / math.sqrt(d))
    finite = [t.nan_to_num(0) for t in (q, k, v)]
    assert_within(out, expected, attention_bound(*finite, 1 / math.sqrt(d), dtype, expected, "cpu", table),
                  "attention")


@FEW
@given(allowed=graphs(), B=st.integers(1, 2), H=st.integers(1, 2), d=st.integers(1, 17),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), layout=st.sampled_from(["projection", "strided"]),
       seed=st.integers(0, 2**31 - 1))
def test_adjacency_attention_triton(allowed, B, H, d, dtype, layout, seed):
    L, S = allowed.shape
    table = neighbour_table(~allowed)
    q, k, v = qkv(B, H, L, S, d, dtype, seed, layout)
    with forced("triton"):
        out = adjacency_attention(*on_triton_device(q, k, v), table).cpu()
    expected = dense_attention64(q, k, v, allowed, 1 / math.sqrt(d))
    assert_within(out, expected, attention_bound(q, k, v, 1 / math.sqrt(d), dtype, expected, "triton", table),
                  "attention")


# -------------------------------------------------------------------------------------------------------------
# mesh_upsample

@st.composite
def chains(draw):
    """1-3 random sparse matrices [V1, V0], [V2, V1], ... (COO or CSR, float32 or float64, empty rows, explicit
    zeros) and the vertex count V0 they take."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    sizes = draw(st.lists(st.integers(1, 40), min_size=2, max_size=4))
    mats = []
    for rows, cols in zip(sizes[1:], sizes[:-1]):
        dense = torch.rand(rows, cols, generator=g, dtype=torch.float64)
        keep = torch.rand(rows, cols, generator=g) < draw(st.floats(0.0, 0.4))
        m = torch.where(keep, dense, 0).to_sparse_coo()
        if draw(st.booleans()) and m._nnz():  # an explicit zero is still an entry
            idx, val = m.indices(), m.values().clone()
            val[0] = 0.0
            m = torch.sparse_coo_tensor(idx, val, m.shape, check_invariants=True).coalesce()
        m = m.to(draw(st.sampled_from([torch.float32, torch.float64])))
        mats.append(m.to_sparse_csr() if draw(st.booleans()) else m)
    return sizes[0], mats


def chain_reference(x, mats):
    """tore_reference's matrix-by-matrix, sample-by-sample product in float64, and the error bound of a
    kernel computing it in x's compute type: the same chain applied to |x| with |M| (each output sums
    <= prod(V) paths, every path's product rounded a few times, a precomposed matrix rounded once more),
    then the cast to x's dtype."""
    ref64 = [m.to_sparse_coo().to(torch.float64) for m in mats]
    expected = tore_reference.Mesh._apply(x.double(), ref64)
    magnitude = tore_reference.Mesh._apply(x.double().abs().nan_to_num(0, 0, 0), [m.abs() for m in ref64])
    paths = math.prod(m.shape[1] for m in mats)
    bound = (2 * len(mats) + 4 + paths) * acc_unit(x.dtype) * magnitude + unit(x.dtype) * expected.abs()
    return expected, bound


@given(chain=chains(), B=st.one_of(st.none(), st.integers(0, 4)), C=st.integers(1, 5), dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**31 - 1), special=st.sampled_from([0.0, 0.05]),
       impl=st.sampled_from(cpu_impls("mesh_upsample")))
def test_mesh_upsample(chain, B, C, dtype, layout, seed, special, impl):
    V, mats = chain
    shape = (V, C) if B is None else (B, V, C)
    x = relayout(values(shape, dtype, seed, 1.0, special), layout)
    with forced(impl):
        out = mesh_upsample(x, mats)
    rows = mats[-1].shape[0]
    assert out.shape == ((rows, C) if B is None else (B, rows, C)) and out.dtype == dtype
    if B == 0:
        return  # the reference's per-sample loop cannot stack zero samples; the shape is all there is
    expected, bound = chain_reference(x, mats)
    if special and len(mats) > 1:
        # Non-finite inputs through a chain of 2+ matrices: the precomposed product and the matrix-by-matrix
        # reference need not agree on which outputs turn inf - inf = NaN; only the finite outputs are compared.
        both = expected.isfinite() & out.isfinite()
        out, expected, bound = out[both], expected[both], bound[both]
    assert_within(out, expected, bound, "mesh_upsample")


@given(chain=chains(), B=st.integers(1, 3), seed=st.integers(0, 2**31 - 1),
       impl=st.sampled_from(cpu_impls("mesh_upsample")))
def test_mesh_upsample_gradient(chain, B, seed, impl):
    V, mats = chain
    x = values((B, V, 3), torch.float64, seed).requires_grad_(True)
    with forced(impl):
        out = mesh_upsample(x, mats)
    grad = values(out.shape, torch.float64, seed + 1)
    got = torch.autograd.grad(out, x, grad)[0]
    ref64 = [m.to_sparse_coo().to(torch.float64) for m in mats]
    want = torch.autograd.grad(tore_reference.Mesh._apply(x, ref64), x, grad)[0]
    # float64 throughout (float32 matrices are upcast exactly); sums in another order: 1e-12 relative
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * (1 + float(want.abs().max())))
