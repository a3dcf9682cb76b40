"""tore_reference checked against the spec (tore-model.md) by independent means: numpy formulas, loops,
hand-computed cases, dense matrices, and the released parameter names."""
import math
import os

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from tore_reference import (FastMETROHead, ImageTokenPruner, Mesh, ToreFastMETROHead, Transformer,
                            build_position_encoding, build_transformer, image_token_pruning, itp_loss,
                            orthographic_projection, token_occupancy, vertex_attention_mask)
from tore_reference.mesh import scipy_to_torch_sparse

F64 = dict(atol=1e-10, rtol=1e-10)  # float64 vs float64: only summation-order differences


# ---------------------------------------------------------------- positional encoding (section 4)

def numpy_sine_encoding(h, w, hidden_dim):
    """[E, h, w] straight from the formula, in float64."""
    feats = hidden_dim // 2
    rows, cols = np.meshgrid(np.arange(1, h + 1), np.arange(1, w + 1), indexing="ij")
    y = rows / (h + 1e-6) * 2 * np.pi
    x = cols / (w + 1e-6) * 2 * np.pi
    out = np.empty((hidden_dim, h, w))
    for c in range(feats):
        fn = np.sin if c % 2 == 0 else np.cos
        freq = 10000.0 ** (2 * (c // 2) / feats)
        out[c] = fn(y / freq)
        out[feats + c] = fn(x / freq)
    return out


@pytest.mark.parametrize("h,w,hidden_dim",
                         [(39, 1, 512), (24, 1, 128), (14, 1, 128), (7, 7, 512), (3, 5, 16), (1, 1, 8)])
def test_position_encoding_matches_formula(h, w, hidden_dim):
    enc = build_position_encoding(hidden_dim=hidden_dim)
    grid = enc(2, h, w, "cpu")
    assert grid.shape == (2, hidden_dim, h, w) and grid.dtype == torch.float32
    expected = numpy_sine_encoding(h, w, hidden_dim)
    # float32 evaluation of sin/cos at arguments up to 2*pi: a few ulps of 2*pi
    np.testing.assert_allclose(grid[0].numpy(), expected, atol=1e-5, rtol=0)
    assert torch.equal(grid[0], grid[1])
    seq = enc.sequence(2, h, w, dtype=torch.float64)
    assert seq.shape == (h * w, 2, hidden_dim) and seq.dtype == torch.float64
    r, c = h - 1, w // 2  # row-major token order: index = row * w + col
    np.testing.assert_allclose(seq[r * w + c, 1].numpy(), expected[:, r, c], atol=1e-5, rtol=0)


def test_position_encoding_rejects_bad_arguments():
    with pytest.raises(ValueError, match="hidden_dim"):
        build_position_encoding(hidden_dim=130)  # 65 features: sin/cos pairs do not close
    with pytest.raises(ValueError, match="pos_type"):
        build_position_encoding(hidden_dim=128, pos_type="learned")
    with pytest.raises(ValueError, match="h"):
        build_position_encoding(hidden_dim=8)(1, 0, 1, "cpu")


# ---------------------------------------------------------------- transformer (section 2)

def hand_layer_norm(x, ln):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def hand_attention(q, k, v, attn, mask=None):
    """Multi-head attention on [L, B, E] from the packed in-projection, written out."""
    E, H = q.shape[-1], attn.num_heads
    d = E // H
    wq, wk, wv = attn.in_proj_weight.chunk(3)
    bq, bk, bv = attn.in_proj_bias.chunk(3)

    def heads(x, w, b):  # [L, B, E] -> [B, H, L, d]
        y = x @ w.T + b
        return y.reshape(x.shape[0], x.shape[1], H, d).permute(1, 2, 0, 3)

    Q, K, Vv = heads(q, wq, bq), heads(k, wk, bk), heads(v, wv, bv)
    scores = Q @ K.transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ Vv  # [B, H, Lq, d]
    out = out.permute(2, 0, 1, 3).reshape(q.shape[0], q.shape[1], E)
    return out @ attn.out_proj.weight.T + attn.out_proj.bias


def hand_mlp(x, layer, ln):
    return torch.relu(hand_layer_norm(x, ln) @ layer.linear1.weight.T + layer.linear1.bias) @ layer.linear2.weight.T \
        + layer.linear2.bias


def hand_transformer(t, img, cam, queries, pos, mask):
    x = torch.cat([cam, img])
    for layer in t.encoder.layers:
        y = hand_layer_norm(x, layer.norm1)
        qk = torch.cat([y[:1], y[1:] + pos])  # the camera token gets no position
        x = x + hand_attention(qk, qk, y, layer.self_attn)
        x = x + hand_mlp(x, layer, layer.norm2)
    x = hand_layer_norm(x, t.encoder.norm)
    cam_out, memory = x[:1], x[1:]
    q = queries
    for layer in t.decoder.layers:  # query_pos is zero
        y = hand_layer_norm(q, layer.norm1)
        q = q + hand_attention(y, y, y, layer.self_attn, mask)
        q = q + hand_attention(hand_layer_norm(q, layer.norm2), memory + pos, memory, layer.multihead_attn)
        q = q + hand_mlp(q, layer, layer.norm3)
    return cam_out, memory, hand_layer_norm(q, t.decoder.norm)


def random_mask(n, generator, p=0.4):
    """True = may not attend; the diagonal stays open so no row is fully masked."""
    mask = torch.rand(n, n, generator=generator) < p
    mask.fill_diagonal_(False)
    return mask


def tiny_transformer_inputs(dtype, hw=5, batch=2, queries=6, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return (make(hw, batch, dim), make(1, batch, dim), make(queries, batch, dim), make(hw, batch, dim),
            random_mask(queries, g))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64), (torch.float32, dict(atol=2e-5, rtol=2e-5))])
def test_transformer_matches_hand_composition(dtype, tol):
    torch.manual_seed(0)
    t = Transformer(model_dim=8, nhead=2, num_enc_layers=2, num_dec_layers=2, feedforward_dim=12).eval()
    img, cam, queries, pos, mask = tiny_transformer_inputs(torch.float64)
    with torch.no_grad():
        expected = hand_transformer(t.double(), img, cam, queries, pos, mask)
        got = t.to(dtype)(img.to(dtype), cam.to(dtype), queries.to(dtype), pos.to(dtype), attention_mask=mask)
        unmasked = t(img.to(dtype), cam.to(dtype), queries.to(dtype), pos.to(dtype))[2]
    for g_, e in zip(got, expected):
        torch.testing.assert_close(g_.double(), e, **tol)
    assert got[0].shape == (1, 2, 8) and got[1].shape == (5, 2, 8) and got[2].shape == (6, 2, 8)
    assert not torch.allclose(unmasked, got[2])  # the mask does something, so the comparison above can fail


def test_transformer_gradcheck():
    torch.manual_seed(1)
    t = build_transformer({"model_dim": 8, "nhead": 2, "feedforward_dim": 8, "dropout": 0.1,
                           "num_enc_layers": 1, "num_dec_layers": 2}).double().eval()
    img, cam, queries, pos, mask = tiny_transformer_inputs(torch.float64, hw=3, queries=4)
    inputs = tuple(x.requires_grad_() for x in (img, cam, queries))
    assert torch.autograd.gradcheck(lambda *a: t(*a, pos, attention_mask=mask), inputs, fast_mode=True)


def test_transformer_validates_inputs():
    t = Transformer(model_dim=8, nhead=2, num_enc_layers=1, num_dec_layers=1, feedforward_dim=8)
    img, cam, queries, pos, mask = tiny_transformer_inputs(torch.float32)
    with pytest.raises(ValueError, match="pos_embed"):
        t(img, cam, queries, pos[:-1])
    with pytest.raises(ValueError, match="cam_token"):
        t(img, cam[:, :1], queries, pos)
    with pytest.raises(TypeError, match="img_features"):
        t(img.long(), cam, queries, pos)
    with pytest.raises(ValueError, match="attention_mask"):
        t(img, cam, queries, pos, attention_mask=mask[:-1])
    full_row = mask.clone()
    full_row[2] = True
    with pytest.raises(ValueError, match="every key is masked"):
        t(img, cam, queries, pos, attention_mask=full_row)
    with pytest.raises(ValueError, match="divisible"):
        Transformer(model_dim=10, nhead=4)


# ---------------------------------------------------------------- image token pruner (section 1)

def numpy_itp(features, conv_w, conv_b, fc_w, fc_b, ln_w, ln_b, eps):
    """Each step of section 1 as loops / plain numpy, float64."""
    B, C, H, W = features.shape
    C4 = conv_w.shape[0]
    padded = np.pad(features, ((0, 0), (0, 0), (1, 1), (1, 1)))
    conv = np.empty((B, C4, H, W))
    for b in range(B):
        for o in range(C4):
            for r in range(H):
                for c in range(W):
                    conv[b, o, r, c] = conv_b[o] + np.sum(conv_w[o] * padded[b, :, r:r + 3, c:c + 3])
    gelu = 0.5 * conv * (1 + np.vectorize(math.erf)(conv / math.sqrt(2)))
    tokens = np.empty((B, H * W, C4))
    flat = np.empty((B, H * W, C))
    for r in range(H):
        for c in range(W):
            tokens[:, r * W + c] = gelu[:, :, r, c]
            flat[:, r * W + c] = features[:, :, r, c]
    logits = tokens @ fc_w.T + fc_b  # [B, HW, N]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    heatmap = (e / e.sum(axis=1, keepdims=True)).transpose(0, 2, 1)  # softmax over HW, then [B, N, HW]
    z = heatmap @ flat
    out = np.empty_like(z)
    for b in range(B):  # LayerNorm over the whole [N, C] block of each sample
        mu, var = z[b].mean(), z[b].var()
        out[b] = (z[b] - mu) / np.sqrt(var + eps) * ln_w + ln_b
    return out, heatmap


@pytest.mark.parametrize("B,C,H,W,N", [(2, 8, 3, 5, 4), (1, 16, 7, 7, 39), (3, 4, 2, 2, 1)])
def test_image_token_pruning_matches_loops(B, C, H, W, N):
    torch.manual_seed(B * 100 + N)
    itp = ImageTokenPruner(C, N).double()
    with torch.no_grad():  # non-trivial affine LayerNorm parameters
        itp.layer_norm.weight.normal_()
        itp.layer_norm.bias.normal_()
    features = torch.randn(B, C, H, W, dtype=torch.float64)
    tokens, heatmap = itp(features)
    as_np = lambda p: p.detach().numpy()  # noqa: E731
    exp_tokens, exp_heatmap = numpy_itp(features.numpy(), as_np(itp.token_selector_conv2d.weight),
                                        as_np(itp.token_selector_conv2d.bias), as_np(itp.token_selector_fc.weight),
                                        as_np(itp.token_selector_fc.bias), as_np(itp.layer_norm.weight),
                                        as_np(itp.layer_norm.bias), itp.layer_norm.eps)
    assert tokens.shape == (B, N, C) and heatmap.shape == (B, N, H * W)
    np.testing.assert_allclose(heatmap.detach().numpy(), exp_heatmap, **F64)
    np.testing.assert_allclose(tokens.detach().numpy(), exp_tokens, **F64)
    functional = image_token_pruning(features, itp.token_selector_conv2d, itp.token_selector_fc, itp.layer_norm)
    assert torch.equal(functional[0], tokens)


# ---------------------------------------------------------------- projection and ITP supervision (section 6)

def test_orthographic_projection_hand_case():
    X = torch.tensor([[[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]],
                      [[0.0, 0.0, 9.0], [2.0, -2.0, 1.0]]])
    camera = torch.tensor([[2.0, 0.5, -1.0], [-0.5, 1.0, 1.0]])
    # s * (xy + t): translation before scale, z ignored
    expected = torch.tensor([[[3.0, 2.0], [-1.0, -1.0]],
                             [[-0.5, -0.5], [-1.5, 0.5]]])
    assert torch.equal(orthographic_projection(X, camera), expected)


def test_token_occupancy_borders_and_outside():
    points = torch.tensor([[
        [-1.0, -1.0],     # g = (0, 0): lower border is inside -> cell (row 0, col 0)
        [1.0, 0.0],       # gx = 7: upper border is outside
        [-1.0001, 0.0],   # just left of the grid: outside
        [0.0, 0.0],       # g = (3.5, 3.5) -> (3, 3)
        [-1.0, 0.9],      # x -> col 0, y -> gy = 6.65 -> row 6: rows follow y
        [0.5, 2.0],       # y outside
        [5.0, -5.0],      # both outside
    ]])
    expected = torch.zeros(1, 7, 7)
    expected[0, 0, 0] = expected[0, 3, 3] = expected[0, 6, 0] = 1
    assert torch.equal(token_occupancy(points), expected)


def test_token_occupancy_interior_borders_non_square():
    # grid 4 rows x 8 cols; these coordinates map exactly onto interior cell borders
    points = torch.tensor([[[-0.75, 0.0], [0.25, -0.5], [0.999999, 0.999999]],
                           [[-1.0, 1.0], [1.0, -1.0], [-2.0, -2.0]]])
    expected = torch.zeros(2, 4, 8)
    expected[0, 2, 1] = 1  # gx = 1.0 -> col 1, gy = 2.0 -> row 2
    expected[0, 1, 5] = 1  # gx = 5.0, gy = 1.0
    expected[0, 3, 7] = 1  # just inside the far corner
    # sample 1: every point on an upper border or outside
    assert torch.equal(token_occupancy(points, grid_size=(4, 8)), expected)


def test_itp_loss_hand_case():
    heatmap = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]],
                            [[0.4, 0.3, 0.2, 0.1], [0.0, 0.7, 0.0, 0.0]]], dtype=torch.float64)
    points = torch.tensor([[[-0.5, -0.5], [0.5, -0.5]],   # cells (0, 0) and (0, 1): flat indices 0 and 1
                           [[1.5, 0.0], [0.0, 1.0]]], dtype=torch.float64)  # both outside
    # sample 0: cluster 0 -> [0, 1/3, 2/3, 1], free cells 2, 3 -> 5/3; constant cluster 1 -> all 0
    # sample 1: cluster 0 -> [1, 2/3, 1/3, 0] = 2; cluster 1 -> [0, 1, 0, 0] = 1; nothing occupied
    loss = itp_loss(heatmap, points, torch.tensor([1, 0]), grid_size=(2, 2))
    assert abs(loss.item() - 5 / 3) < 1e-9
    loss = itp_loss(heatmap, points, torch.tensor([1, 1]), grid_size=(2, 2))
    assert abs(loss.item() - (5 / 3 + 3)) < 1e-9
    assert itp_loss(heatmap, points, torch.tensor([0, 0]), grid_size=(2, 2)).item() == 0


# ---------------------------------------------------------------- mesh sampler (section 5)

def random_sparse(rows, cols, seed, per_row=3, dtype=np.float32):
    rng = np.random.default_rng(seed)
    r = np.repeat(np.arange(rows), per_row)
    c = rng.integers(0, cols, rows * per_row)
    return sp.coo_matrix((rng.random(rows * per_row).astype(dtype), (r, c)), shape=(rows, cols))


def random_mesh(sizes, dtype=np.float32, seed=0):
    """Mesh over levels ``sizes`` (finest first) with random 3-per-row matrices; also the dense ones."""
    U = [random_sparse(sizes[i], sizes[i + 1], seed + i, dtype=dtype) for i in range(len(sizes) - 1)]
    D = [random_sparse(sizes[i + 1], sizes[i], seed + 10 + i, dtype=dtype) for i in range(len(sizes) - 1)]
    mesh = Mesh([to_torch(u) for u in U], [to_torch(d) for d in D])
    return mesh, [torch.from_numpy(u.toarray()) for u in U], [torch.from_numpy(d.toarray()) for d in D]


def to_torch(m):
    t = scipy_to_torch_sparse(m)
    return t.to(torch.float64) if m.dtype == np.float64 else t


def test_mesh_matches_dense_matmul():
    mesh, U, D = random_mesh([12, 7, 4])
    x = torch.randn(3, 4, 3)
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mesh.upsample(x, n1=2, n2=1), U[1] @ x, **tol)
    torch.testing.assert_close(mesh.upsample(x, n1=2, n2=0), U[0] @ (U[1] @ x), **tol)
    torch.testing.assert_close(mesh.upsample(x[0], n1=2, n2=0), U[0] @ (U[1] @ x[0]), **tol)  # one mesh [V, 3]
    y = torch.randn(2, 7, 3)
    torch.testing.assert_close(mesh.upsample(y), U[0] @ y, **tol)  # default: level 1 -> 0
    z = torch.randn(2, 12, 3)
    torch.testing.assert_close(mesh.downsample(z), D[1] @ (D[0] @ z), **tol)  # default: all the way down
    torch.testing.assert_close(mesh.downsample(z, n1=0, n2=1), D[0] @ z, **tol)


def test_mesh_real_fastmetro_files(fastmetro_data):
    data = np.load(os.path.join(fastmetro_data, "mesh_downsampling.npz"), encoding="latin1", allow_pickle=True)
    U0, U1 = data["U"][0].tocsr(), data["U"][1].tocsr()
    assert U1.shape == (1723, 431) and U0.shape == (6890, 1723)
    assert set(np.diff(U1.indptr)) == {3} and set(np.diff(U0.indptr)) == {3}
    mesh = Mesh.from_fastmetro(os.path.join(fastmetro_data, "mesh_downsampling.npz"))
    x = torch.randn(2, 431, 3)
    mid = mesh.upsample(x, n1=2, n2=1)
    fine = mesh.upsample(mid, n1=1, n2=0)
    dense1 = torch.from_numpy(U1.toarray()).float()
    dense0 = torch.from_numpy(U0.toarray()).float()
    torch.testing.assert_close(mid, dense1 @ x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fine, dense0 @ (dense1 @ x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- the heads (section 3)

SMALL = dict(backbone_channels=16, nhead=4)
SMALL_TORE = dict(SMALL, model_dims=(32, 16, 16), feedforward_dims=(48, 24, 24))
SMALL_FM = dict(SMALL, model_dims=(32, 16), feedforward_dims=(48, 24))


def random_adjacency(n, seed):
    """Symmetric, self-loops, row-normalised like the released values (only the pattern matters)."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.rand(n, n, generator=g) < 0.012).float()
    a = ((a + a.T + torch.eye(n)) > 0).float()
    return a / a.sum(1, keepdim=True)


@pytest.fixture(scope="module")
def smpl_like():
    adjacency = random_adjacency(431, 0)
    mesh, U, _ = random_mesh([6890, 1723, 431])
    return adjacency, mesh, U


def test_tore_head_forward_backward(smpl_like):
    adjacency, mesh, U = smpl_like
    torch.manual_seed(0)
    head = ToreFastMETROHead(adjacency.to_sparse(), mesh, model_size="S", **SMALL_TORE)
    assert head.keep_num == 39
    features = torch.randn(2, 16, 7, 7)
    cam, joints, coarse, mid, fine, heatmap = head.eval()(features)
    assert cam.shape == (2, 3) and joints.shape == (2, 14, 3) and coarse.shape == (2, 431, 3)
    assert mid.shape == (2, 1723, 3) and fine.shape == (2, 6890, 3) and heatmap.shape == (2, 39, 49)
    torch.testing.assert_close(heatmap.sum(-1), torch.ones(2, 39))  # each cluster: a distribution over space
    torch.testing.assert_close(mid, U[1] @ coarse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fine, U[0] @ mid, atol=1e-5, rtol=1e-5)

    head.train()
    outputs = head(features)
    sum(o.square().mean() for o in outputs).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_tore_head_without_itp(smpl_like):
    adjacency, mesh, _ = smpl_like
    head = ToreFastMETROHead(adjacency, mesh, model_size="M", use_itp=False, **SMALL_TORE).eval()
    out = head(torch.randn(1, 16, 5, 6))  # all 30 image tokens, 2-D positions
    assert len(out) == 5 and out[2].shape == (1, 431, 3)
    assert not any(n.startswith(("token_selector", "layer_norm")) for n in head.state_dict())


def check_vertex_mask_semantics(head, adjacency, vertices=(0, 100, 430)):
    """With one decoder layer (model S), vertex token j reaches exactly the vertices that may attend to
    it: coarse[i] changes iff adjacency[i, j] != 0 (everything after the self-attention is per token)."""
    head.eval()
    features = torch.randn(1, head.backbone_channels, 7, 7)
    with torch.no_grad():
        base = head(features)[2][0]
        for j in vertices:
            saved = head.vertex_token_embed.weight[j].clone()
            # not a constant shift: the pre-norm LayerNorm would remove it before the attention
            head.vertex_token_embed.weight[j] += torch.randn_like(saved)
            changed = (head(features)[2][0] != base).any(dim=1)
            head.vertex_token_embed.weight[j] = saved
            assert torch.equal(changed, adjacency[:, j] != 0), j


def test_tore_head_mask_is_adjacency(smpl_like):
    adjacency, mesh, _ = smpl_like
    torch.manual_seed(0)
    head = ToreFastMETROHead(adjacency, mesh, model_size="S", **SMALL_TORE)
    assert torch.equal(head.attention_mask, adjacency == 0)
    check_vertex_mask_semantics(head, adjacency)


def test_fastmetro_head(smpl_like):
    adjacency, mesh, U = smpl_like
    torch.manual_seed(0)
    head = FastMETROHead(adjacency, mesh, model_size="S", **SMALL_FM)
    mask = head.attention_mask
    assert mask.shape == (445, 445) and not mask[:14].any() and not mask[:, :14].any()
    assert torch.equal(mask[14:, 14:], adjacency == 0)
    out = head.eval()(torch.randn(2, 16, 7, 7))
    assert list(out) == ["pred_cam", "pred_3d_joints", "pred_3d_vertices_coarse", "pred_3d_vertices_intermediate",
                         "pred_3d_vertices_fine"]
    assert out["pred_3d_joints"].shape == (2, 14, 3) and out["pred_3d_vertices_coarse"].shape == (2, 431, 3)
    torch.testing.assert_close(out["pred_3d_vertices_fine"], U[0] @ out["pred_3d_vertices_intermediate"],
                               atol=1e-5, rtol=1e-5)
    sum(v.square().mean() for v in out.values()).backward()
    assert all(p.grad is not None for p in head.parameters())


def test_fastmetro_hand_head():
    adjacency = random_adjacency(195, 3)
    mesh, U, _ = random_mesh([778, 195])
    head = FastMETROHead(adjacency, mesh, model_size="S", num_joints=21, num_vertices=195, intermediate_vertices=None,
                         **SMALL_FM).eval()
    out = head(torch.randn(1, 16, 7, 7))
    assert "pred_3d_vertices_intermediate" not in out and out["pred_3d_joints"].shape == (1, 21, 3)
    torch.testing.assert_close(out["pred_3d_vertices_fine"], U[0] @ out["pred_3d_vertices_coarse"],
                               atol=1e-5, rtol=1e-5)


def test_heads_state_dict_round_trip(smpl_like):
    adjacency, mesh, _ = smpl_like
    a = ToreFastMETROHead(adjacency, mesh, model_size="S", keep_ratio=0.5, **SMALL_TORE).eval()
    b = ToreFastMETROHead(adjacency, mesh, model_size="S", keep_ratio=0.5, **SMALL_TORE).eval()
    b.load_state_dict(a.state_dict())
    features = torch.randn(1, 16, 7, 7)
    for x, y in zip(a(features), b(features)):
        assert torch.equal(x, y)


def released_transformer_keys(prefix, layers):
    """The parameter names of FastMETRO's transformer.py with ``layers`` encoder and decoder layers."""
    attn = ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    wb = lambda *names: [f"{n}.{s}" for n in names for s in ("weight", "bias")]  # noqa: E731
    keys = []
    for i in range(layers):
        enc, dec = f"{prefix}.encoder.layers.{i}.", f"{prefix}.decoder.layers.{i}."
        keys += [enc + "self_attn." + a for a in attn] + [enc + k for k in wb("linear1", "linear2", "norm1", "norm2")]
        keys += [dec + m + "." + a for m in ("self_attn", "multihead_attn") for a in attn]
        keys += [dec + k for k in wb("linear1", "linear2", "norm1", "norm2", "norm3")]
    return keys + wb(f"{prefix}.encoder.norm", f"{prefix}.decoder.norm")


@pytest.mark.parametrize("model_size,layers", [("S", 1), ("L", 3)])
def test_tore_head_released_state_dict_names(model_size, layers):
    wb = lambda *names: [f"{n}.{s}" for n in names for s in ("weight", "bias")]  # noqa: E731
    expected = wb("conv_1x1", "token_selector_conv2d", "token_selector_fc", "layer_norm", "dim_reduce_enc",
                  "dim_reduce_dec", "xyz_regressor_j", "xyz_regressor_v", "cam_predictor")
    expected += ["cam_token_embed.weight", "joint_token_embed.weight", "vertex_token_embed.weight"]
    for t in ("transformer_1", "transformer_2", "transformer_3"):
        expected += released_transformer_keys(t, layers)
    adjacency = random_adjacency(431, 1)
    with torch.device("meta"):  # names and shapes only: skip the initialisation of 27M parameters
        head = ToreFastMETROHead(adjacency, Mesh([], []), model_size=model_size)
    state = head.state_dict()
    assert sorted(state) == sorted(expected)
    shapes = {"conv_1x1.weight": (512, 2048, 1, 1), "token_selector_conv2d.weight": (128, 512, 3, 3),
              "token_selector_fc.weight": (39, 128), "layer_norm.weight": (39, 512), "layer_norm.bias": (39, 512),
              "cam_token_embed.weight": (1, 512), "joint_token_embed.weight": (14, 512),
              "vertex_token_embed.weight": (431, 128), "dim_reduce_enc.weight": (128, 512),
              "xyz_regressor_j.weight": (3, 128), "xyz_regressor_v.weight": (3, 128), "cam_predictor.weight": (3, 128),
              "transformer_1.encoder.layers.0.linear1.weight": (2048, 512),
              "transformer_3.decoder.layers.0.linear1.weight": (512, 128),
              "transformer_3.decoder.layers.0.self_attn.in_proj_weight": (384, 128)}
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert head.attention_mask.shape == (431, 431)  # a buffer, but not saved: the released one is an attribute


def test_fastmetro_head_released_state_dict_names():
    wb = lambda *names: [f"{n}.{s}" for n in names for s in ("weight", "bias")]  # noqa: E731
    expected = wb("conv_1x1", "dim_reduce_enc_cam", "dim_reduce_enc_img", "dim_reduce_dec", "xyz_regressor",
                  "cam_predictor", "coarse2intermediate_upsample")
    expected += ["cam_token_embed.weight", "joint_token_embed.weight", "vertex_token_embed.weight"]
    expected += released_transformer_keys("transformer_1", 3) + released_transformer_keys("transformer_2", 3)
    adjacency = random_adjacency(431, 2)
    with torch.device("meta"):
        head = FastMETROHead(adjacency, Mesh([], []))
    state = head.state_dict()
    assert sorted(state) == sorted(expected)
    assert state["vertex_token_embed.weight"].shape == (431, 512)
    assert state["coarse2intermediate_upsample.weight"].shape == (1723, 431)


def test_heads_validate_inputs(smpl_like):
    adjacency, mesh, _ = smpl_like
    head = ToreFastMETROHead(adjacency, mesh, model_size="S", **SMALL_TORE)
    with pytest.raises(ValueError, match="features"):
        head(torch.randn(1, 8, 7, 7))
    with pytest.raises(ValueError, match="features"):
        head(torch.randn(1, 16, 6, 7))  # the ITP was built for 7 x 7
    with pytest.raises(TypeError, match="features"):
        head(torch.ones(1, 16, 7, 7, dtype=torch.int64))
    with pytest.raises(ValueError, match="adjacency"):
        ToreFastMETROHead(adjacency[:-1, :-1], mesh, **SMALL_TORE)
    with pytest.raises(ValueError, match="diagonal"):
        ToreFastMETROHead(adjacency != 0, mesh, **SMALL_TORE)  # a bool adjacency where the mask was expected
    isolated = adjacency.clone()
    isolated[5] = 0
    with pytest.raises(ValueError, match="every key is masked"):
        vertex_attention_mask(isolated)
    with pytest.raises(ValueError, match="model_size"):
        ToreFastMETROHead(adjacency, mesh, model_size="XL", **SMALL_TORE)
    with pytest.raises(ValueError, match="keep_ratio"):
        ToreFastMETROHead(adjacency, mesh, keep_ratio=0.0, **SMALL_TORE)
    with pytest.raises(ValueError, match="model_dims"):
        ToreFastMETROHead(adjacency, mesh, **dict(SMALL_TORE, model_dims=(32, 16, 8)))
    with pytest.raises(TypeError, match="mesh_sampler"):
        FastMETROHead(adjacency, object(), **SMALL_FM)


def load_smpl_adjacency(folder):
    load = lambda name: torch.load(os.path.join(folder, f"smpl_431_adjmat_{name}.pt"))  # noqa: E731
    return torch.sparse_coo_tensor(load("indices"), load("values"), size=load("size"))


def test_heads_with_real_smpl_data(fastmetro_data):
    adjacency = load_smpl_adjacency(fastmetro_data)
    mesh = Mesh.from_fastmetro(os.path.join(fastmetro_data, "mesh_downsampling.npz"))
    dense = adjacency.to_dense()
    allowed = (dense != 0).sum(1)
    assert torch.equal(dense != 0, (dense != 0).T) and (dense.diagonal() != 0).all()
    assert allowed.min() == 4 and allowed.max() == 11 and abs(allowed.float().mean().item() - 6.97) < 0.01
    torch.manual_seed(0)
    head = ToreFastMETROHead(adjacency, mesh, model_size="S", **SMALL_TORE)
    assert torch.equal(head.attention_mask, dense == 0)
    check_vertex_mask_semantics(head, dense, vertices=(0, 215))
    out = head(torch.randn(2, 16, 7, 7))
    assert out[4].shape == (2, 6890, 3) and torch.isfinite(out[4]).all()
    fm = FastMETROHead(adjacency, mesh, model_size="S", **SMALL_FM).eval()
    assert fm(torch.randn(1, 16, 7, 7))["pred_3d_vertices_fine"].shape == (1, 6890, 3)
