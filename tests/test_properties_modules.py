"""Property tests (hypothesis) of the drop-in modules against the modules they replace: ImageTokenPruner vs
tore_reference's, AdjacencyMultiheadAttention vs nn.MultiheadAttention, MeshSampler vs tore_reference.Mesh.
Helpers (strategies, relayout, error bounds) come from test_properties_ops."""
import math

import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn

import tore_reference
from test_properties_ops import LAYOUTS, assert_itp_close, assert_within, chain_reference, graphs, relayout, values
from tore_kernels.nn import AdjacencyMultiheadAttention, ImageTokenPruner, MeshSampler

# -------------------------------------------------------------------------------------------------------------
# ImageTokenPruner


@given(B=st.integers(1, 3), C=st.sampled_from([4, 8, 16]), H=st.integers(1, 5), W=st.integers(1, 5),
       n_frac=st.floats(0, 1), dtype=st.sampled_from([torch.float32, torch.float64]),
       layout=st.sampled_from(LAYOUTS + ("channels_last",)), seq_first=st.booleans(),
       via=st.sampled_from(["state_dict", "from_model"]), seed=st.integers(0, 2**31 - 1))
def test_image_token_pruner(B, C, H, W, n_frac, dtype, layout, seq_first, via, seed):
    N = 1 + int(n_frac * (H * W - 1))
    torch.manual_seed(seed)
    ref = tore_reference.ImageTokenPruner(C, N).double()
    with torch.no_grad():
        ref.layer_norm.weight.uniform_(0.5, 1.5)
        ref.layer_norm.bias.uniform_(-0.5, 0.5)
    if via == "from_model":
        fast = ImageTokenPruner.from_model(ref, grid_size=(H, W), seq_first=seq_first).to(dtype)
    else:
        fast = ImageTokenPruner(C, N, grid_size=(H, W), seq_first=seq_first).to(dtype)
        fast.load_state_dict(ref.state_dict())
    features = torch.randn(B, C, H, W, dtype=torch.float64).to(dtype)
    features = (features.to(memory_format=torch.channels_last) if layout == "channels_last"
                else relayout(features, layout))
    with torch.no_grad():
        tokens, heatmap = fast(features)
    assert_itp_close(tokens, heatmap, ref, features, dtype, seq_first)  # bounds derived there


# -------------------------------------------------------------------------------------------------------------
# AdjacencyMultiheadAttention

def mha_pair(E, H, batch_first, dtype, seed):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first).to(torch.float64).eval()
    with torch.no_grad():  # non-zero biases
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    fast = AdjacencyMultiheadAttention.from_module(mha).to(dtype)
    theirs = AdjacencyMultiheadAttention.from_module(mha)  # only to copy: nn.MultiheadAttention in dtype below
    mha_dtype = nn.MultiheadAttention(E, H, batch_first=batch_first).to(dtype).eval()
    mha_dtype.load_state_dict(theirs.state_dict())
    return mha, mha_dtype, fast


def no_worse(got, same_dtype, exact, what):
    """The fast module is as accurate as nn.MultiheadAttention in the same dtype: its worst error against the
    float64 module is within 4x nn.MultiheadAttention's own plus a few ulps of the output's scale."""
    if exact.numel() == 0:
        assert got.shape == exact.shape
        return
    assert got.shape == exact.shape and got.dtype == same_dtype.dtype, what
    scale = float(exact.abs().max())
    err, theirs = ((t.double() - exact).abs().max().item() for t in (got, same_dtype))
    ulps = 8 * torch.finfo(got.dtype).eps * (scale + 1)
    assert err <= 4 * theirs + ulps, f"{what}: error {err:.3g} vs nn.MultiheadAttention's {theirs:.3g} (+{ulps:.2g})"


@given(allowed=graphs(), B=st.integers(0, 3), heads=st.sampled_from([1, 2, 4]), head_dim=st.integers(1, 9),
       dtype=st.sampled_from([torch.float32, torch.float64]), batch_first=st.booleans(),
       sharing=st.sampled_from(["qkv", "qk", "none"]), as_float=st.booleans(), need_weights=st.booleans(),
       average=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_adjacency_multihead_attention(allowed, B, heads, head_dim, dtype, batch_first, sharing, as_float,
                                       need_weights, average, seed):
    L, S = allowed.shape
    if sharing != "none" and L != S:
        sharing = "none"
    E = heads * head_dim
    mha64, mha, fast = mha_pair(E, heads, batch_first, dtype, seed)
    blocked = ~allowed
    mask = torch.zeros(L, S, dtype=dtype).masked_fill(blocked, -math.inf) if as_float else blocked

    def seq(n, i):
        return values((B, n, E) if batch_first else (n, B, E), torch.float64, seed + i).to(dtype)

    q = seq(L, 1)
    k = q if sharing in ("qkv", "qk") else seq(S, 2)
    v = q if sharing == "qkv" else seq(S, 3)
    kwargs = dict(need_weights=need_weights, average_attn_weights=average)
    with torch.no_grad():
        event("neighbour-table path" if fast._sparse_table(q, k, v, None, need_weights, mask, False) is not None
              else "nn.MultiheadAttention path")
        got = fast(q, k, v, attn_mask=mask, **kwargs)
        same = mha(q, k, v, attn_mask=mask, **kwargs)
        m64 = mask.double() if as_float else mask
        qd = q.double()
        kd = qd if k is q else k.double()
        vd = qd if v is q else v.double()
        exact = mha64(qd, kd, vd, attn_mask=m64, **kwargs)
    no_worse(got[0], same[0], exact[0], "output")
    if need_weights and exact[1] is not None:
        no_worse(got[1], same[1], exact[1], "weights")
    elif need_weights:  # nn.MultiheadAttention returns None for an empty batch; an empty tensor is as good
        assert B == 0 and (got[1] is None or got[1].numel() == 0)
    else:
        assert got[1] is None


@settings(max_examples=max(4, settings.default.max_examples // 2))
@given(allowed=graphs(max_n=48), B=st.integers(1, 2), heads=st.sampled_from([1, 2]), head_dim=st.integers(1, 6),
       batch_first=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_adjacency_multihead_attention_gradients(allowed, B, heads, head_dim, batch_first, seed):
    L, S = allowed.shape
    E = heads * head_dim
    mha64, _, fast = mha_pair(E, heads, batch_first, torch.float64, seed)
    x = values((B, L, E) if batch_first else (L, B, E), torch.float64, seed + 1)
    mem = values((B, S, E) if batch_first else (S, B, E), torch.float64, seed + 2)
    grads = []
    for module in (fast, mha64):
        q, kv = x.clone().requires_grad_(True), mem.clone().requires_grad_(True)
        out = module(q, kv, kv, attn_mask=~allowed, need_weights=False)[0]
        grad = values(out.shape, torch.float64, seed + 3)
        grads.append(torch.autograd.grad(out, (q, kv, *module.parameters()), grad))
    # float64 on both sides: the same sums in another order, far below 1e-9 of the largest gradient.
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * (1 + float(b.abs().max())))


# -------------------------------------------------------------------------------------------------------------
# MeshSampler

@st.composite
def samplers(draw):
    """A tore_reference.Mesh with 1-3 levels of random sparse U [V_i, V_i+1] / D [V_i+1, V_i] (float32 COO)."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    sizes = draw(st.lists(st.integers(1, 40), min_size=2, max_size=4))
    ups, downs = [], []
    for fine, coarse in zip(sizes[:-1], sizes[1:]):
        for rows, cols, out in ((fine, coarse, ups), (coarse, fine, downs)):
            keep = torch.rand(rows, cols, generator=g) < draw(st.floats(0.0, 0.4))
            out.append(torch.where(keep, torch.rand(rows, cols, generator=g), 0).to_sparse_coo())
    return tore_reference.Mesh(ups, downs)


@given(mesh=samplers(), B=st.one_of(st.none(), st.integers(1, 3)), C=st.integers(1, 4),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), layout=st.sampled_from(LAYOUTS),
       levels=st.tuples(st.integers(0, 3), st.integers(0, 3)), seed=st.integers(0, 2**31 - 1))
def test_mesh_sampler(mesh, B, C, dtype, layout, levels, seed):
    sampler = MeshSampler.from_sampler(mesh)
    depth = len(mesh._U)
    lo, hi = sorted(min(n, depth) for n in levels)
    counts = sampler.num_vertices
    for direction, start, mats in (("upsample", hi, [mesh._U[i] for i in reversed(range(lo, hi))]),
                                   ("downsample", lo, [mesh._D[i] for i in range(lo, hi)])):
        shape = (counts[start], C) if B is None else (B, counts[start], C)
        x = relayout(values(shape, dtype, seed), layout)
        if direction == "upsample":
            out = sampler.upsample(x, n1=hi, n2=lo)
        else:
            out = sampler.downsample(x, n1=lo, n2=hi)
        if not mats:  # nothing to apply: the released sampler returns its input
            assert out is x
            continue
        expected, bound = chain_reference(x, mats)
        assert_within(out, expected, bound, direction)
