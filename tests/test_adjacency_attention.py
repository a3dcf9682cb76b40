"""Neighbour-list attention (tore_kernels.ops.adjacency_attention) and AdjacencyMultiheadAttention,
against dense masked softmax attention (SDPA in float64) and nn.MultiheadAttention."""
import importlib
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tore_kernels import backend
from tore_kernels.nn.attention import AdjacencyMultiheadAttention
from isa_clones import run_under_clone

# the submodule (its name is also the exported function's, which `from ... import` would give)
aa = importlib.import_module("tore_kernels.ops.adjacency_attention")
linear_module = importlib.import_module("tore_kernels.ops.linear")
needs_ext = pytest.mark.skipif(not backend.HAS_EXTENSION, reason="tore_kernels._C is not built")

# Output of a softmax-weighted mean of O(1) values: fp32 rounding of a few dozen terms stays far below
# 1e-5; half types are read and written once in their precision (accumulation in fp32), so one output
# ulp: 2^-11 (fp16), 2^-8 (bf16) relative, doubled for the rounded inputs.
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3),
       torch.bfloat16: (2e-2, 2e-2)}


def random_graph(n, p, seed, extra=()):
    """Symmetric bool adjacency with self-loops; ``extra`` adds features: 'hub' (a row open to half the
    nodes), 'leaf' (a degree-1 row: only its self-loop), 'split' (two disconnected components)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, n, generator=g) < p
    if "split" in extra:
        a[: n // 2, n // 2:] = False
        a[n // 2:, : n // 2] = False
    a = a | a.T
    if "hub" in extra:
        a[1, ::2] = True
        a[::2, 1] = True
    if "leaf" in extra:
        a[n - 1] = False
        a[:, n - 1] = False
    return a | torch.eye(n, dtype=torch.bool)


def fastmetro_mask(folder, name):
    idx = torch.load(os.path.join(folder, f"{name}_adjmat_indices.pt"), weights_only=True)
    size = torch.load(os.path.join(folder, f"{name}_adjmat_size.pt"), weights_only=True)
    adj = torch.zeros(tuple(int(s) for s in size), dtype=torch.bool)
    adj[idx[0], idx[1]] = True
    return ~adj  # True = may not attend


def prefix_mask(vertex_allowed, prefix=14):
    """FastMETRO without GTR: joint tokens first, their rows and columns fully open."""
    n = vertex_allowed.shape[0] + prefix
    allowed = torch.ones(n, n, dtype=torch.bool)
    allowed[prefix:, prefix:] = vertex_allowed
    return ~allowed


def reference(q, k, v, blocked):
    out = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=~blocked.to(q.device))
    return out.to(q.dtype)


def qkv_views(B, H, L, d, dtype, seed=0, seq_first=True, device="cpu"):
    """q, k, v as [B, H, L, d] views of one packed projection output, as the module produces them."""
    g = torch.Generator().manual_seed(seed)
    shape = (L, B, 3, H, d) if seq_first else (B, L, 3, H, d)
    proj = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)
    perm = (1, 2, 0, 3) if seq_first else (0, 2, 1, 3)
    return [proj[:, :, i].permute(perm) for i in range(3)]


# --------------------------------------------------------------------------------------------- table

def test_table_encodes_mask_and_dense_prefix():
    allowed = random_graph(431, 0.015, 0)
    blocked = prefix_mask(allowed)
    t = aa.neighbour_table(blocked)
    assert t.shared.tolist() == list(range(14))
    assert t.dense_rows.tolist() == list(range(14))
    assert t.index.shape[1] == int(allowed.sum(1).max())  # table width: vertex neighbours only
    assert torch.equal(t.allowed(), ~blocked)
    assert (t.count[:14] == -1).all()


def test_table_float_mask_and_cache():
    blocked = ~random_graph(50, 0.1, 1)
    additive = torch.zeros(50, 50).masked_fill(blocked, float("-inf"))
    assert torch.equal(aa.neighbour_table(additive).allowed(), ~blocked)
    t1 = aa.neighbour_table(blocked)
    assert aa.neighbour_table(blocked) is t1  # cached per tensor
    blocked[3, 7] = not bool(blocked[3, 7])  # in place: version bump rebuilds
    t2 = aa.neighbour_table(blocked)
    assert t2 is not t1 and torch.equal(t2.allowed(), ~blocked)


def test_table_rejects_bad_masks():
    blocked = ~random_graph(20, 0.2, 2)
    blocked[5] = True
    with pytest.raises(ValueError, match="row 5"):
        aa.neighbour_table(blocked)
    biased = torch.zeros(20, 20)
    biased[0, 1] = 0.5
    with pytest.raises(ValueError, match="finite non-zero"):
        aa.neighbour_table(biased)
    assert aa.table_or_none(biased) is None
    with pytest.raises(ValueError, match="2-D"):
        aa.neighbour_table(torch.zeros(2, 20, 20, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        aa.neighbour_table(torch.zeros(20, 20, dtype=torch.int64))
    nan = torch.zeros(20, 20)
    nan[2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        aa.neighbour_table(nan)


# -------------------------------------------------------------------------------------- functional op

GRAPHS = {
    "random": lambda: ~random_graph(37, 0.1, 3),
    "hub_leaf_split": lambda: ~random_graph(53, 0.08, 4, ("hub", "leaf", "split")),
    "dense_rows": lambda: ~random_graph(300, 0.01, 5, ("hub", "leaf")),  # hub row is dense (150 > 75 keys)
    "prefix445": lambda: prefix_mask(random_graph(431, 0.015, 6)),
}


@pytest.mark.parametrize("graph", list(GRAPHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_forward_matches_masked_softmax(graph, dtype, monkeypatch):
    monkeypatch.setenv("TORE_KERNELS_BACKEND", "cpu")
    blocked = GRAPHS[graph]()
    L = blocked.shape[0]
    table = aa.neighbour_table(blocked)
    if graph == "dense_rows":
        assert table.dense_rows.tolist() == [1]
    q, k, v = qkv_views(3, 2, L, 16, dtype, seed=L)
    out = aa.adjacency_attention(q, k, v, table)
    torch.testing.assert_close(out, reference(q, k, v, blocked), atol=TOL[dtype][0], rtol=TOL[dtype][1])


@needs_ext
@pytest.mark.parametrize("d", [8, 12, 16, 64])
@pytest.mark.parametrize("layout", [aa.LAYOUT_BHLD, aa.LAYOUT_BLHD, aa.LAYOUT_LBHD])
def test_strides_head_dims_layouts(d, layout):
    blocked = ~random_graph(41, 0.1, 7, ("leaf",))
    t = aa.neighbour_table(blocked)
    q, k, v = qkv_views(2, 3, 41, d, torch.float32, seed=d)
    k = k.transpose(-1, -2).contiguous().transpose(-1, -2)  # non-unit last-dim stride
    out, lse = torch.ops.tore_kernels.adjacency_attention_forward(q, k, v, t.index, t.count, t.shared,
                                                                  d ** -0.5, layout)
    expect_order = {aa.LAYOUT_BHLD: (0, 1, 2, 3), aa.LAYOUT_BLHD: (0, 2, 1, 3), aa.LAYOUT_LBHD: (2, 0, 1, 3)}
    assert out.permute(expect_order[layout]).is_contiguous()
    torch.testing.assert_close(out, reference(q, k, v, blocked), atol=2e-5, rtol=2e-5)
    scores = (q.double() @ k.double().transpose(-1, -2)) * d ** -0.5
    torch.testing.assert_close(lse.double(), scores.masked_fill(blocked, float("-inf")).logsumexp(-1),
                               atol=1e-5, rtol=1e-5)


@needs_ext
def test_gradcheck_float64(monkeypatch):
    monkeypatch.setenv("TORE_KERNELS_BACKEND", "cpu")
    blocked = ~random_graph(24, 0.12, 4, ("hub", "leaf", "split"))
    table = aa.neighbour_table(blocked, dense_row_degree=8)  # the hub row (12 keys) goes dense
    assert table.dense_rows.tolist() == [1]
    q, k, v = [t.detach().requires_grad_() for t in qkv_views(1, 2, 24, 4, torch.float64)]
    # fast_mode: checks random projections of the Jacobian (full mode costs ~1000 op calls here)
    assert torch.autograd.gradcheck(lambda q, k, v: aa.adjacency_attention(q, k, v, table), (q, k, v),
                                    fast_mode=True)


@needs_ext
def test_gradcheck_dense_prefix_rows(monkeypatch):
    # dense rows are written into the kernel's output out of place under autograd (in place without it)
    monkeypatch.setenv("TORE_KERNELS_BACKEND", "cpu")
    table = aa.neighbour_table(prefix_mask(random_graph(20, 0.15, 8), prefix=2), dense_row_degree=20)
    assert table.dense_rows.tolist() == [0, 1]
    q, k, v = [t.detach().requires_grad_() for t in qkv_views(1, 2, 22, 4, torch.float64)]
    assert torch.autograd.gradcheck(lambda q, k, v: aa.adjacency_attention(q, k, v, table), (q, k, v),
                                    fast_mode=True)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_reference(dtype, monkeypatch):
    monkeypatch.setenv("TORE_KERNELS_BACKEND", "cpu")
    blocked = GRAPHS["prefix445"]()
    table = aa.neighbour_table(blocked)
    q, k, v = [t.detach().requires_grad_() for t in qkv_views(2, 2, 445, 16, dtype)]
    grad = torch.randn(2, 2, 445, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = torch.autograd.grad(aa.adjacency_attention(q, k, v, table), (q, k, v), grad)
    want = torch.autograd.grad(reference(q, k, v, blocked), (q, k, v), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=TOL[dtype][0] * 4, rtol=TOL[dtype][1])


@needs_ext
def test_opcheck():
    blocked = GRAPHS["prefix445"]()[:30, :30]
    t = aa.neighbour_table(blocked, dense_row_degree=20)
    assert t.dense_rows.numel() == 14 and t.shared.numel() == 14
    q, k, v = [x.detach().requires_grad_() for x in qkv_views(2, 2, 30, 8, torch.float32)]
    ops = torch.ops.tore_kernels
    torch.library.opcheck(ops.adjacency_attention_forward, (q, k, v, t.index, t.count, t.shared, 0.3, 2))
    out, lse = ops.adjacency_attention_forward(q, k, v, t.index, t.count, t.shared, 0.3, 0)
    grad = torch.randn_like(out)
    # not differentiable: every check but the one that differentiates them, which must raise instead
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    backward_args = (grad, q.detach(), k.detach(), v.detach(), out.detach(), lse, t.index, t.count, t.shared, 0.3)
    probs_args = (q.detach(), k.detach(), lse, t.index, t.count, t.shared, 0.3)
    torch.library.opcheck(ops.adjacency_attention_backward, backward_args, test_utils=checks)
    torch.library.opcheck(ops.adjacency_attention_probs, probs_args, test_utils=checks)
    with pytest.raises(RuntimeError, match="adjacency_attention_backward is not differentiable"):
        ops.adjacency_attention_backward(grad.requires_grad_(), *backward_args[1:])[0].sum().backward()
    with pytest.raises(RuntimeError, match="adjacency_attention_probs is not differentiable"):
        ops.adjacency_attention_probs(q, k, *probs_args[2:]).sum().backward()


def reference_weights(q, k, blocked, scale):
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    return scores.masked_fill(blocked, float("-inf")).softmax(-1).mean(1)


# (H, d, dtype, unit last-dim stride): the fused fp32 kernels, AVX-512 for d % 16 == 0 and H dividing 16 (the
# d = 16 specialisation, generic d, H * d not a multiple of 128: its tails; rows with more than 128 (neighbour,
# head) pairs, prefix445, go to AVX2) and AVX2 for d % 8 == 0 with head counts that are not a multiple of 8 and
# H * d not a multiple of 32 (its tails); the generic kernel otherwise
WEIGHTS_CASES = [(8, 16, torch.float32, True), (3, 8, torch.float32, True), (5, 24, torch.float32, True),
                 (2, 128, torch.float32, True), (9, 16, torch.float32, True), (2, 12, torch.float32, True),
                 (1, 32, torch.float32, True), (4, 48, torch.float32, True), (16, 16, torch.float32, True),
                 (8, 32, torch.float32, True), (3, 16, torch.float32, False), (4, 16, torch.float64, True),
                 (2, 16, torch.bfloat16, True)]


@needs_ext
@pytest.mark.parametrize("H,d,dtype,unit", WEIGHTS_CASES)
@pytest.mark.parametrize("graph", ["hub_leaf_split", "prefix445"])
def test_forward_weights_op(graph, H, d, dtype, unit):
    blocked = GRAPHS[graph]()
    L = blocked.shape[0]
    t = aa.neighbour_table(blocked, dense_row_degree=L)  # every row sparse: the kernel writes all weights
    q, k, v = qkv_views(2, H, L, d, dtype, seed=H * d)
    if not unit:
        k = k.transpose(-1, -2).contiguous().transpose(-1, -2)
    scale = d ** -0.5
    out, lse, weights = torch.ops.tore_kernels.adjacency_attention_forward_weights(
        q, k, v, t.index, t.count, t.shared, scale, aa.LAYOUT_LBHD)
    out2, lse2 = torch.ops.tore_kernels.adjacency_attention_forward(q, k, v, t.index, t.count, t.shared, scale,
                                                                    aa.LAYOUT_LBHD)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, reference(q, k, v, blocked), atol=atol, rtol=rtol)
    want = reference_weights(q, k, blocked, scale)
    assert weights.shape == (2, L, L) and weights.dtype == dtype
    torch.testing.assert_close(weights.double(), want, atol=atol / 10, rtol=rtol)
    assert not weights[blocked.expand(2, L, L)].any()  # blocked pairs are exactly zero


@needs_ext
@pytest.mark.parametrize("H,d,N", [(8, 16, 128), (4, 32, 64), (2, 16, 48), (3, 16, 64)])  # N 48, H 3: two-step path
@pytest.mark.parametrize("seq_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("B,L", [(3, 53), (1, 14)])  # 1 x 14: fewer rows than one task takes (split over threads)
def test_forward_projected_op(H, d, N, seq_first, bias, B, L):
    """The attention out-projected in one op (inference): F.linear of the reference attention's output."""
    blocked = GRAPHS["hub_leaf_split"]()[:L, :L]
    t = aa.neighbour_table(blocked, dense_row_degree=L)  # no dense rows
    q, k, v = qkv_views(B, H, L, d, torch.float32, seed=H + d, seq_first=seq_first)
    g = torch.Generator().manual_seed(N)
    w, b = torch.randn(N, H * d, generator=g) / d, (torch.randn(N, generator=g) if bias else None)
    y = torch.ops.tore_kernels.adjacency_attention_forward_projected(q, k, v, t.index, t.count, t.shared, d ** -0.5,
                                                                     w.t().contiguous(), b)
    want = F.linear(reference(q, k, v, blocked).transpose(1, 2).flatten(2), w, b)  # [B, L, N]
    assert y.shape == want.shape
    assert y.transpose(0, 1).is_contiguous() if seq_first else y.is_contiguous()  # in q's token order
    torch.testing.assert_close(y, want, atol=2e-5, rtol=2e-5)


@needs_ext
@pytest.mark.parametrize("clone", backend.ISA_CLONES)
def test_out_projected_only_where_it_fuses(clone, monkeypatch):
    """The module's skip-weights inference path takes the fused attention + out-projection op only in the AVX-512
    clone (elsewhere that op runs the same two steps with an unpacked GEMM: the caller's packed linear is faster)."""
    monkeypatch.setenv("TORE_KERNELS_BACKEND", "cpu")
    monkeypatch.setattr(backend, "cpu_isa", lambda: clone)
    blocked = GRAPHS["hub_leaf_split"]()
    t = aa.neighbour_table(blocked, dense_row_degree=blocked.shape[0])
    q, k, v = qkv_views(2, 8, blocked.shape[0], 16, torch.float32, seed=5, seq_first=True)
    w, b = torch.randn(128, 128) / 16, torch.randn(128)
    with torch.no_grad():
        y = aa.attention_out_projected(q, k, v, t, 0.25, w, b)
    assert (y is None) == (clone != "avx512")
    if y is not None:
        torch.testing.assert_close(y, F.linear(reference(q, k, v, blocked).transpose(1, 2).flatten(2), w, b),
                                   atol=2e-5, rtol=2e-5)


@needs_ext
def test_forward_projected_op_checks():
    blocked = GRAPHS["dense_rows"]()
    t = aa.neighbour_table(blocked)
    q, k, v = qkv_views(2, 2, blocked.shape[0], 16, torch.float32)
    wt = torch.randn(32, 64)
    ops = torch.ops.tore_kernels
    with pytest.raises(RuntimeError, match="dense row"):
        ops.adjacency_attention_forward_projected(q, k, v, t.index, t.count, t.shared, 0.25, wt, None)
    t = aa.neighbour_table(blocked, dense_row_degree=blocked.shape[0])
    with pytest.raises(RuntimeError, match="wt must be"):
        ops.adjacency_attention_forward_projected(q, k, v, t.index, t.count, t.shared, 0.25, wt[:16], None)
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.adjacency_attention_forward_projected(q, k, v, t.index, t.count, t.shared, 0.25, wt, torch.zeros(3))
    args = (q, k, v, t.index, t.count, t.shared, 0.25, wt, torch.zeros(64))
    torch.library.opcheck(ops.adjacency_attention_forward_projected, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def _mha_case(E, H, L, S, B, seq_first, sharing, bias, seed=0):
    """(float64 nn.MultiheadAttention, query, key, value) for the whole-block op; sharing: which inputs coincide."""
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, H, bias=bias, batch_first=not seq_first).double().eval()
    if bias:
        with torch.no_grad():
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    g = torch.Generator().manual_seed(seed + 1)
    x = [torch.randn(n, B, E, generator=g) for n in (L, S, S)]
    query, key, value = {"qkv": (x[0], x[0], x[0]), "qk": (x[0], x[0], x[2]), "kv": (x[0], x[1], x[1]),
                         "none": tuple(x)}[sharing]
    if not seq_first:
        query, key, value = (t.transpose(0, 1).contiguous() for t in (query, key, value))
    return mha, query, key, value


def _mha_op(mha, query, key, value, table, seq_first):
    """The op on batch-first views of fp32 copies of mha's weights and the inputs, as mha_inference calls it."""
    f = (lambda t: t.transpose(0, 1)) if seq_first else (lambda t: t)
    w = {n: p.detach().float() for n, p in mha.named_parameters()}
    y = torch.ops.tore_kernels.adjacency_mha_forward(
        f(query), f(key), f(value), w["in_proj_weight"].t().contiguous(), w.get("in_proj_bias"), table.index,
        table.count, table.shared, mha.num_heads, (mha.embed_dim // mha.num_heads) ** -0.5,
        w["out_proj.weight"].t().contiguous(), w.get("out_proj.bias"))
    return y.transpose(0, 1) if seq_first else y


# (E, H): the fused AVX-512 kernel (d = 16, 16, 64), and shapes it leaves to the separate steps (E % 64, H = 3)
MHA_SHAPES = [(128, 8), (64, 4), (128, 2), (96, 3), (48, 4)]


@needs_ext
@pytest.mark.parametrize("E,H", MHA_SHAPES)
@pytest.mark.parametrize("sharing", ["qk", "qkv", "none"])
@pytest.mark.parametrize("seq_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_mha_forward_op(E, H, sharing, seq_first, bias):
    """nn.MultiheadAttention's whole inference block (in-projection, attention, out-projection) in one op: float64
    nn.MultiheadAttention with the mask, for self-attention over a graph with leaf rows and two components."""
    blocked = ~random_graph(70, 0.04, 16, ("leaf", "split"))
    t = aa.neighbour_table(blocked, dense_row_degree=70)
    fused = backend.cpu_isa() == "avx512" and E % 64 == 0 and H != 3
    assert torch.ops.tore_kernels.adjacency_mha_fused(torch.get_num_threads(), E, H, t.shared.numel() + t.width) \
        == fused  # the fused kernel is what these cases cover, where the CPU has it
    mha, query, key, value = _mha_case(E, H, 70, 70, 3, seq_first, sharing, bias)
    y = _mha_op(mha, query, key, value, t, seq_first)
    want = mha(query.double(), key.double(), value.double(), attn_mask=blocked, need_weights=False)[0]
    assert y.dtype == torch.float32 and y.shape == want.shape
    assert y.is_contiguous()  # in the query's memory order, seq-first or batch-first
    torch.testing.assert_close(y.double(), want, atol=2e-5, rtol=2e-5)


@needs_ext
@pytest.mark.parametrize("seq_first", [True, False])
@pytest.mark.parametrize("B", [1, 5])
def test_mha_forward_op_cross_attention(seq_first, B):
    """431 queries, 14 shared keys without a mask (the decoder's cross-attention), key and value from one tensor."""
    t = aa.open_table(431, 14, torch.device("cpu"))
    mha, query, key, value = _mha_case(128, 8, 431, 14, B, seq_first, "kv", True, seed=3)
    y = _mha_op(mha, query, key, value, t, seq_first)
    want = mha(query.double(), key.double(), value.double(), need_weights=False)[0]
    torch.testing.assert_close(y.double(), want, atol=2e-5, rtol=2e-5)


@needs_ext
def test_mha_forward_op_checks():
    blocked = GRAPHS["dense_rows"]()
    L = blocked.shape[0]
    x = torch.randn(2, L, 64)
    in_wt, out_wt, b = torch.randn(64, 192), torch.randn(64, 64), torch.zeros(64)
    ops = torch.ops.tore_kernels

    def call(t, query=x, in_wt=in_wt, in_bias=None, out_wt=out_wt, out_bias=b, heads=4):
        return ops.adjacency_mha_forward(query, x, x, in_wt, in_bias, t.index, t.count, t.shared, heads, 0.25,
                                         out_wt, out_bias)

    with pytest.raises(RuntimeError, match="dense row"):
        call(aa.neighbour_table(blocked))
    t = aa.neighbour_table(blocked, dense_row_degree=L)
    for kwargs, message in (({"in_wt": in_wt[:, :64]}, "in_wt must be"), ({"out_wt": out_wt.t()}, "out_wt must be"),
                            ({"in_bias": b}, "in_wt's bias must be"), ({"heads": 3}, "num_heads"),
                            ({"query": x.double()}, "float32"), ({"query": x[:, :, :32]}, "query must be")):
        with pytest.raises(RuntimeError, match=message):
            call(t, **kwargs)
    sparse = aa.neighbour_table(~random_graph(L, 0.01, 5, ("leaf",)))
    assert ops.adjacency_mha_fused(torch.get_num_threads(), 64, 4, sparse.width) == \
        (backend.cpu_isa() == "avx512")
    for table in (t, sparse):  # the separate steps (the hub row is too wide), the fused kernel: empty batches
        e = x[:0]
        y = ops.adjacency_mha_forward(e, e, e, in_wt, None, table.index, table.count, table.shared, 4, 0.25, out_wt, b)
        assert y.shape == (0, L, 64)
    with pytest.raises(RuntimeError, match="not differentiable"):
        ops.adjacency_mha_forward(x.requires_grad_(), x, x, in_wt, None, t.index, t.count, t.shared, 4, 0.25,
                                  out_wt, None).sum().backward()
    args = (x.detach().transpose(0, 1).contiguous().transpose(0, 1), x.detach(), x.detach(), in_wt, torch.zeros(192),
            t.index, t.count, t.shared, 4, 0.25, out_wt, b)
    torch.library.opcheck(ops.adjacency_mha_forward, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@needs_ext
def test_mha_fused_only_where_faster():
    """The fused op's tasks are samples: batches that would leave threads idle, other shapes and other CPUs run
    the separate steps."""
    fused = torch.ops.tore_kernels.adjacency_mha_fused
    threads = torch.get_num_threads()
    avx512 = backend.cpu_isa() == "avx512"
    assert fused(threads, 128, 8, 16) == avx512 and fused(4 * threads + 1, 128, 8, 16) == avx512
    assert not fused(threads, 128, 8, 17)  # more than 8 vectors of (neighbour, head) scores per row
    assert not fused(threads, 96, 8, 7) and not fused(threads, 128, 3, 7) and not fused(threads, 128, 16, 7)
    assert not fused(0, 128, 8, 7) and not fused(threads, 128, 0, 7)
    if threads > 1:
        assert not fused(1, 128, 8, 7) and not fused(threads + 1, 128, 8, 7)


@needs_ext
@pytest.mark.parametrize("batch_first", [False, True])
def test_module_inference_runs_whole_block_op(batch_first, monkeypatch):
    """Without weights, in inference, the module runs the whole-block op where it is faster and the separate steps
    elsewhere (gradients, weights wanted): both match nn.MultiheadAttention."""
    monkeypatch.setenv("TORE_KERNELS_BACKEND", "cpu")
    attention_module = importlib.import_module("tore_kernels.nn.attention")
    used = []

    def counting(*args):
        y = aa.mha_inference(*args)
        used.append(y is not None)
        return y

    monkeypatch.setattr(attention_module, "mha_inference", counting)
    mha, fast = _pair(E=128, H=8, batch_first=batch_first)
    blocked = ~random_graph(90, 0.03, 17, ("leaf",))  # at most 16 keys a row: 8 heads fit the fused kernel
    qk, v = _decoder_inputs(90, 2 * torch.get_num_threads(), 128, batch_first)
    with torch.no_grad():
        want = mha(qk, qk, v, attn_mask=blocked, need_weights=False)[0]
        got, weights = fast(qk, qk, v, attn_mask=blocked, need_weights=False)
    assert weights is None and used == [backend.cpu_isa() == "avx512"]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    qk_g = qk.clone().requires_grad_()
    got = fast(qk_g, qk_g, v, attn_mask=blocked, need_weights=False)[0]
    assert used[-1] is False and got.requires_grad  # autograd: the separate, differentiable steps
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    strided = torch.stack((qk, qk), -1)[..., 0]  # a last dimension with stride 2: the separate steps
    with torch.no_grad():
        got = fast(strided, strided, v, attn_mask=blocked, need_weights=False)[0]
    assert used[-1] is False
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    # unmasked cross-attention to 16 keys (every key shared, 16 x 8 heads = the kernel's 8 vectors): the op too
    joints = _decoder_inputs(16, qk.shape[0 if batch_first else 1], 128, batch_first, seed=1)[1]
    with torch.no_grad():
        got = fast(qk, joints, joints, need_weights=False)[0]
        want = mha(qk, joints, joints, need_weights=False)[0]
    assert used[-1] == (backend.cpu_isa() == "avx512")
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@needs_ext
def test_averaged_weights_with_dense_rows(monkeypatch):
    monkeypatch.setenv("TORE_KERNELS_BACKEND", "cpu")
    blocked = GRAPHS["prefix445"]()
    t = aa.neighbour_table(blocked)
    assert t.dense_rows.numel() == 14
    q, k, v = qkv_views(2, 8, 445, 16, torch.float32, seed=3)
    out, weights = aa.attention_with_averaged_weights(q, k, v, t, 0.25, aa.LAYOUT_LBHD)
    torch.testing.assert_close(out, reference(q, k, v, blocked), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(weights.double(), reference_weights(q, k, blocked, 0.25), atol=2e-6, rtol=2e-5)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_weights_nan_input_propagates(dtype):
    """Through the fused kernels (views of one projection; with AVX-512 also bf16, whose rounding keeps NaN)."""
    blocked = ~random_graph(20, 0.2, 14)
    t = aa.neighbour_table(blocked)
    q, k, v = qkv_views(1, 8, 20, 16, dtype)
    k[0, 3, 0, 5] = float("nan")  # key 0 of head 3: every row that sees key 0 gets NaN in head 3
    out, _, weights = torch.ops.tore_kernels.adjacency_attention_forward_weights(
        q, k, v, t.index, t.count, t.shared, 0.25, aa.LAYOUT_BHLD)
    sees = ~blocked[:, 0]
    assert out[0, 3, sees].isnan().all() and not out[0, 3, ~sees].isnan().any()
    assert not out[0, :3].isnan().any() and weights[0, sees].isnan().any(dim=-1).all()


@needs_ext
def test_opcheck_forward_weights():
    blocked = GRAPHS["prefix445"]()[:30, :30]
    t = aa.neighbour_table(blocked, dense_row_degree=20)
    q, k, v = qkv_views(2, 2, 30, 8, torch.float32)
    torch.library.opcheck(torch.ops.tore_kernels.adjacency_attention_forward_weights,
                          (q, k, v, t.index, t.count, t.shared, 0.3, 2))


def test_functional_validates_inputs():
    table = aa.neighbour_table(~random_graph(10, 0.3, 8))
    q = torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match="q must be"):
        aa.adjacency_attention(q[0], q, q, table)
    with pytest.raises(TypeError, match="k must have q's dtype"):
        aa.adjacency_attention(q, q.double(), q, table)
    with pytest.raises(ValueError, match="table is for"):
        aa.adjacency_attention(q[:, :, :9], q, q, table)
    with pytest.raises(TypeError, match="NeighbourTable"):
        aa.adjacency_attention(q, q, q, torch.zeros(10, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="scale"):
        aa.adjacency_attention(q, q, q, table, scale=-1.0)
    with pytest.raises(TypeError, match="q must be float16"):
        aa.adjacency_attention(q.long(), q.long(), q.long(), table)


# ------------------------------------------------------------------------------------------- module

def _pair(E=32, H=4, batch_first=False, seed=0):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first).eval()
    with torch.no_grad():  # non-zero biases so their gradients are checked too
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    return mha, AdjacencyMultiheadAttention.from_module(mha)


def _decoder_inputs(L, B, E, batch_first, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shape = (B, L, E) if batch_first else (L, B, E)
    y = torch.randn(shape, generator=g).to(device)
    return y + torch.zeros_like(y), y  # q = k = y + query_pos (a different tensor from v = y)


def _check_module(mha, fast, blocked, B=3, batch_first=False, grads=True, device="cpu"):
    """``fast`` against ``mha`` (both moved to ``device``, as is the mask): outputs, weights, gradients."""
    mha, fast, blocked = mha.to(device), fast.to(device), blocked.to(device)
    L = blocked.shape[0]
    qk, v = _decoder_inputs(L, B, mha.embed_dim, batch_first, device=device)
    with torch.no_grad():
        for average in (True, False):
            want = mha(qk, qk, v, attn_mask=blocked, average_attn_weights=average)
            got = fast(qk, qk, v, attn_mask=blocked, average_attn_weights=average)
            torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(got[1], want[1], atol=2e-6, rtol=2e-5)
    if grads:
        qk1, v1 = qk.clone().requires_grad_(), v.clone().requires_grad_()
        qk2, v2 = qk.clone().requires_grad_(), v.clone().requires_grad_()
        want = mha(qk1, qk1, v1, attn_mask=blocked, need_weights=False)[0]
        got = fast(qk2, qk2, v2, attn_mask=blocked, need_weights=False)[0]
        grad = torch.randn_like(want)
        gw = torch.autograd.grad(want, (qk1, v1, *mha.parameters()), grad)
        gg = torch.autograd.grad(got, (qk2, v2, *fast.parameters()), grad)
        for a, b in zip(gg, gw):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@needs_ext
@pytest.mark.parametrize("batch_first", [False, True])
def test_module_random_graph(batch_first):
    mha, fast = _pair(batch_first=batch_first)
    blocked = ~random_graph(120, 0.03, 9, ("leaf", "split"))
    qk, v = _decoder_inputs(120, 2, 32, batch_first)
    assert fast._sparse_table(qk, qk, v, None, False, blocked, False) is not None
    _check_module(mha, fast, blocked, batch_first=batch_first)


@needs_ext
def test_module_prefix445():
    mha, fast = _pair(E=64, H=8)
    _check_module(mha, fast, GRAPHS["prefix445"](), B=2)


@needs_ext
@pytest.mark.parametrize("name", ["smpl_431", "mano_195"])
def test_module_fastmetro_meshes(fastmetro_data, name):
    blocked = fastmetro_mask(fastmetro_data, name)
    degree = (~blocked).sum(1)
    assert (~blocked == (~blocked).T).all() and int(degree.min()) >= 3
    mha, fast = _pair(E=128, H=8)
    _check_module(mha, fast, blocked, B=2)
    qk, v = _decoder_inputs(blocked.shape[0], 2 * torch.get_num_threads(), 128, False)
    with torch.no_grad():  # inference without weights: the whole-block op where the CPU has AVX-512
        torch.testing.assert_close(fast(qk, qk, v, attn_mask=blocked, need_weights=False)[0],
                                   mha(qk, qk, v, attn_mask=blocked, need_weights=False)[0], atol=2e-5, rtol=2e-5)


@needs_ext
def test_module_skip_weights_and_dense_fallbacks():
    mha, fast = _pair()
    blocked = ~random_graph(64, 0.05, 10)
    qk, v = _decoder_inputs(64, 2, 32, False)
    fast.skip_unused_weights = True
    with torch.no_grad():
        out, weights = fast(qk, qk, v, attn_mask=blocked)
        assert weights is None
        torch.testing.assert_close(out, mha(qk, qk, v, attn_mask=blocked)[0], atol=2e-5, rtol=2e-5)
    fast.skip_unused_weights = False
    padding = torch.zeros(2, 64, dtype=torch.bool)
    padding[1, 5] = True
    assert fast._sparse_table(qk, qk, v, padding, False, blocked, False) is None  # key_padding_mask: dense
    with torch.no_grad():
        for kwargs in ({"key_padding_mask": padding}, {"attn_mask": blocked.float().masked_fill(blocked, -1.0)},
                       {"attn_mask": None}):
            kwargs.setdefault("attn_mask", blocked)
            want, got = mha(qk, qk, v, **kwargs), fast(qk, qk, v, **kwargs)
            torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(got[1], want[1], atol=2e-6, rtol=2e-5)
    # need_weights while recording gradients: nn.MultiheadAttention's differentiable weights
    qk_g = qk.clone().requires_grad_()
    assert fast._sparse_table(qk_g, qk_g, v, None, True, blocked, False) is None
    assert torch.equal(fast.state_dict()["in_proj_weight"], mha.state_dict()["in_proj_weight"])
    assert list(fast.state_dict()) == list(mha.state_dict())


@needs_ext
@pytest.mark.parametrize("bias", [True, False])
def test_module_inference_projection_sharing(bias):
    """Every way query/key/value may coincide, with and without biases, through the reused inference
    projection buffer: values and weights match nn.MultiheadAttention, and an earlier call's outputs are
    not overwritten by the next call (the buffer only holds per-call intermediates)."""
    torch.manual_seed(5)
    mha = nn.MultiheadAttention(32, 4, bias=bias).eval()
    fast = AdjacencyMultiheadAttention.from_module(mha)
    blocked = ~random_graph(48, 0.06, 15)
    g = torch.Generator().manual_seed(6)
    a, b, c = (torch.randn(48, 2, 32, generator=g) for _ in range(3))
    with torch.no_grad():
        first = fast(a, a, a, attn_mask=blocked)
        kept = [t.clone() for t in first]
        for q, k, v in ((a, a, a), (a, b, b), (a, a, c), (a, b, c)):
            want, got = mha(q, k, v, attn_mask=blocked), fast(q, k, v, attn_mask=blocked)
            torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(got[1], want[1], atol=2e-6, rtol=2e-5)
        for t, k in zip(first, kept):
            assert torch.equal(t, k)


@needs_ext
@pytest.mark.parametrize("batch_first", [False, True])
def test_module_cross_attention_few_keys(batch_first, monkeypatch):
    """The decoder's cross-attention: no mask, 14 keys (memory + pos) and values (memory), an all-False
    key_padding_mask as FastMETRO passes it: the kernel with every key shared; values, weights, gradients."""
    monkeypatch.setenv("TORE_KERNELS_BACKEND", "cpu")
    torch.manual_seed(7)
    mha = nn.MultiheadAttention(64, 4, batch_first=batch_first).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
    fast = AdjacencyMultiheadAttention.from_module(mha)
    g = torch.Generator().manual_seed(8)
    B, L, S = 3, 50, 14
    shape = (lambda n: (B, n, 64)) if batch_first else (lambda n: (n, B, 64))
    query, memory, pos = torch.randn(shape(L), generator=g), torch.randn(shape(S), generator=g), \
        torch.randn(shape(S), generator=g)
    key = memory + pos
    no_padding = torch.zeros(B, S, dtype=torch.bool)
    table = fast._sparse_table(query, key, memory, no_padding, False, None, False)
    assert table is not None and table.shared.tolist() == list(range(S)) and table.width == S
    padding = no_padding.clone()
    padding[1, 3] = True
    assert fast._sparse_table(query, key, memory, padding, False, None, False) is None
    wide = torch.randn(shape(aa_module_max_keys() + 1), generator=g)
    assert fast._sparse_table(query, wide, wide, None, False, None, False) is None
    with torch.no_grad():
        for kwargs in ({}, {"key_padding_mask": no_padding}, {"average_attn_weights": False},
                       {"need_weights": False}):
            want, got = mha(query, key, memory, **kwargs), fast(query, key, memory, **kwargs)
            torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=2e-5)
            if want[1] is None:
                assert got[1] is None
            else:
                torch.testing.assert_close(got[1], want[1], atol=2e-6, rtol=2e-5)
    q1, k1, v1 = (t.clone().requires_grad_() for t in (query, key, memory))
    q2, k2, v2 = (t.clone().requires_grad_() for t in (query, key, memory))
    want = mha(q1, k1, v1, need_weights=False)[0]
    got = fast(q2, k2, v2, need_weights=False)[0]
    grad = torch.randn_like(want)
    gw = torch.autograd.grad(want, (q1, k1, v1, *mha.parameters()), grad)
    gg = torch.autograd.grad(got, (q2, k2, v2, *fast.parameters()), grad)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def aa_module_max_keys():
    from tore_kernels.nn.attention import OPEN_TABLE_MAX_KEYS
    return OPEN_TABLE_MAX_KEYS


@needs_ext
def test_module_float_additive_mask_sparse():
    mha, fast = _pair()
    blocked = ~random_graph(64, 0.05, 11)
    additive = torch.zeros(64, 64).masked_fill(blocked, float("-inf"))
    qk, v = _decoder_inputs(64, 2, 32, False)
    assert fast._sparse_table(qk, qk, v, None, False, additive, False) is not None
    with torch.no_grad():
        torch.testing.assert_close(fast(qk, qk, v, attn_mask=additive)[0], mha(qk, qk, v, attn_mask=additive)[0],
                                   atol=2e-5, rtol=2e-5)


@needs_ext
def test_module_broken_topology_raises():
    _, fast = _pair()
    blocked = ~random_graph(64, 0.05, 12)
    blocked[17] = True
    qk, v = _decoder_inputs(64, 2, 32, False)
    with pytest.raises(ValueError, match="row 17"):
        fast(qk, qk, v, attn_mask=blocked)


def test_from_module_rejects_other_modules():
    with pytest.raises(TypeError, match="nn.MultiheadAttention"):
        AdjacencyMultiheadAttention.from_module(nn.Linear(4, 4))


# ------------------------------------------------------------------ Triton (CUDA tensors, or the interpreter)

COMPILED_ONLY = pytest.mark.skipif(backend.triton_interpret(), reason="too slow for the Triton interpreter")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_forward_backward(triton_backend, dtype):
    allowed = random_graph(43, 0.08, 13, ("leaf", "split"))
    blocked = prefix_mask(allowed, prefix=5)  # 48 tokens: a 5-wide dense prefix block and 5 dense rows
    table = aa.neighbour_table(blocked, dense_row_degree=24)
    assert table.shared.numel() == 5 and table.dense_rows.numel() == 5
    assert backend.choose(aa.OP, triton_backend) == "triton"
    q, k, v = [t.detach().requires_grad_() for t in qkv_views(2, 2, 48, 12, dtype, device=triton_backend)]  # d=12
    out = aa.adjacency_attention(q, k, v, table)
    want = reference(q, k, v, blocked)
    torch.testing.assert_close(out, want, atol=TOL[dtype][0], rtol=TOL[dtype][1])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype).to(triton_backend)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = torch.autograd.grad(want, (q, k, v), grad)
    for g, w in zip(got, ref):
        torch.testing.assert_close(g, w, atol=TOL[dtype][0] * 4, rtol=TOL[dtype][1])


@pytest.mark.parametrize("first, then", [("inference_mode", "no_grad"), ("no_grad", "inference_mode")])
def test_module_packed_weights_across_grad_modes(first, then):
    """The cached packed projection weights work whichever of inference_mode / no_grad made them first."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2).eval()
    fast = AdjacencyMultiheadAttention.from_module(mha)
    blocked = ~torch.eye(10, dtype=torch.bool)
    blocked[0, 1] = False
    x = torch.randn(10, 3, 16)
    with torch.no_grad():
        want = mha(x, x, x, attn_mask=blocked)[0]
    linear_module._DERIVED.clear()  # a cold cache
    for mode in (first, then):
        with getattr(torch, mode)():
            torch.testing.assert_close(fast(x, x, x, attn_mask=blocked)[0], want, rtol=2e-5, atol=2e-5)


def test_triton_grid_puts_batch_times_heads_on_axis_0(triton_backend, monkeypatch):
    """CUDA's grid axes 1 and 2 stop at 65535: batch x heads (e.g. batch 8192 x 8 heads) must be on axis 0."""
    grids = []

    class Capture:  # stands in for the @triton.jit kernel: records the launch grid, then stops the call
        def __getitem__(self, grid):
            grids.append(grid)
            raise InterruptedError

    monkeypatch.setattr(aa, "_forward_kernel", Capture())
    blocked = ~torch.eye(40, dtype=torch.bool)
    q = k = v = torch.randn(3, 5, 40, 8, device=triton_backend)
    with pytest.raises(InterruptedError):
        aa.adjacency_attention(q, k, v, aa.neighbour_table(blocked))
    assert grids[0][0] == 3 * 5 and grids[0][1] <= 40


def test_triton_module(triton_backend):
    mha, fast = _pair(E=32, H=2)
    blocked = ~random_graph(80, 0.03, 14, ("leaf",))
    qk, v = _decoder_inputs(80, 2, 32, False)
    assert fast._sparse_table(qk, qk, v, None, False, blocked, False) is not None
    _check_module(mha, fast, blocked, B=2, device=triton_backend)


@COMPILED_ONLY
@pytest.mark.parametrize("name", ["smpl_431", "mano_195"])
def test_triton_module_fastmetro_meshes(fastmetro_data, name, triton_backend):
    """The released meshes' masks through the Triton kernels at the model's width (128, 8 heads), batch 32 too."""
    blocked = fastmetro_mask(fastmetro_data, name)
    mha, fast = _pair(E=128, H=8)
    _check_module(mha, fast, blocked, B=2, device=triton_backend)
    _check_module(mha, fast, blocked, B=32, grads=False, device=triton_backend)


def test_gpu_report_configs_cover_head_dims_and_dtypes():
    pytest.importorskip("triton")
    names = [c.name for c in aa.gpu_report_configs()]
    for d in (8, 16, 32, 64, 128):
        for ty in ("fp32", "fp16", "bf16"):
            assert f"adjacency_attention_forward[d<={d},{ty}]" in names
            assert f"adjacency_attention_backward[d<={d},{ty}]" in names


def _seq_first_qkv(L, S, B, H, d, seed, broadcast_q=False):
    """q, k, v [B, H, L|S, d] as the patched layers pass them: views of seq-first projections (q one third of a
    packed [L, B, 3, H, d] output; broadcast over the batch when asked)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(L, 1 if broadcast_q else B, 3, H, d, generator=g)[:, :, 0]
    q = (q.expand(-1, B, -1, -1) if broadcast_q else q).permute(1, 2, 0, 3)
    k, v = (torch.randn(S, B, H, d, generator=g).permute(1, 2, 0, 3) for _ in range(2))
    return q, k, v


@needs_ext
@pytest.mark.parametrize("L,S,d", [(445, 49, 64), (50, 50, 16), (431, 14, 16), (3, 1, 32), (5, 16, 48),
                                   (7, 17, 128), (9, 33, 80), (6, 64, 64), (2, 65, 16), (4, 20, 24)])
@pytest.mark.parametrize("broadcast_q", [False, True])
def test_few_keys_attention_op(L, S, d, broadcast_q):
    """The few-keys op (AVX-512 kernel for S <= 64 and d % 16 == 0, SDPA otherwise: S = 65, d = 24, other clones)
    against float64 SDPA: every key-vector count (1-4, with and without padding lanes), 1-3 rows past the last
    block of four, head dims across 64-column chunks, both output layouts, a stride-0 batch of queries."""
    q, k, v = _seq_first_qkv(L, S, 3, 2, d, seed=L * S + d, broadcast_q=broadcast_q)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    for layout in (aa.LAYOUT_LBHD, aa.LAYOUT_BLHD, aa.LAYOUT_BHLD):
        out = torch.ops.tore_kernels.few_keys_attention(q, k, v, d ** -0.5, layout)
        torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
    out = torch.ops.tore_kernels.few_keys_attention(q, k, v, 0.3, aa.LAYOUT_LBHD)  # the scale is honoured
    torch.testing.assert_close(out.double(), F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                                            scale=0.3), rtol=2e-5, atol=2e-5)


@needs_ext
def test_few_keys_attention_opcheck():
    q, k, v = _seq_first_qkv(20, 49, 2, 2, 64, seed=3)
    torch.library.opcheck(torch.ops.tore_kernels.few_keys_attention, (q, k, v, 0.125, aa.LAYOUT_LBHD),
                          test_utils=("test_schema", "test_faketensor"))


@needs_ext
def test_few_keys_attention_nan_propagates():
    """A NaN key makes every row that sees it NaN (as SDPA); other heads stay finite."""
    q, k, v = _seq_first_qkv(10, 49, 2, 2, 64, seed=1)
    k = k.clone()
    k[0, 1, 30, 5] = float("nan")
    out = torch.ops.tore_kernels.few_keys_attention(q, k, v, 0.125, aa.LAYOUT_LBHD)
    assert out[0, 1].isnan().all() and not out[0, 0].isnan().any() and not out[1].isnan().any()


@needs_ext
def test_dense_attention_output_order_and_fallbacks(monkeypatch):
    """dense_attention: SDPA's values in q's [L, B, H, d] memory order (what _attend out-projects as a view),
    through the kernel only in inference on the C++ backend with AVX-512; autograd and bigger key sets get SDPA."""
    q, k, v = _seq_first_qkv(445, 49, 2, 8, 64, seed=2)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    with torch.no_grad():
        out = aa.dense_attention(q, k, v)
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
    assert out.permute(2, 0, 1, 3).is_contiguous()
    calls, real = [], torch.ops.tore_kernels.few_keys_attention

    def spy(*args):
        calls.append(args[1].shape[-2])
        return real(*args)
    monkeypatch.setattr(torch.ops.tore_kernels, "few_keys_attention", spy)
    with torch.no_grad():
        aa.dense_attention(q, k, v)
        k65, v65 = (torch.randn(2, 8, 65, 64) for _ in range(2))
        torch.testing.assert_close(aa.dense_attention(q, k65, v65), F.scaled_dot_product_attention(q, k65, v65))
    qg = q.detach().requires_grad_()
    aa.dense_attention(qg, k, v).sum().backward()  # SDPA's autograd
    assert qg.grad is not None
    assert calls == ([49] if backend.cpu_isa() == "avx512" else [])


# the value tests of the CPU kernels: what each ISA clone reruns
CLONE_TESTS = ("test_forward_weights_op or test_strides_head_dims_layouts or test_module_random_graph or nan_input "
               "or forward_projected or mha_forward or test_module_inference_runs_whole_block_op "
               "or test_module_cross_attention_few_keys or few_keys_attention or test_dense_attention")


@needs_ext
@pytest.mark.parametrize("clone", backend.ISA_CLONES)
def test_cpu_kernel_every_isa_clone(clone):
    """The fp32 forward has AVX-512 and AVX2 kernels and a portable one, chosen once per process by the CPU and
    ATen's ATEN_CPU_CAPABILITY: rerun the op's value tests under each clone this CPU can execute (a cap above the
    CPU would run torch's own kernels into SIGILL)."""
    run_under_clone(clone, __file__, CLONE_TESTS)

