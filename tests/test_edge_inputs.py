"""Valid edge inputs not drawn by the property tests (tests/test_properties_*.py draw empty and size-1 batches,
odd sizes, strided views, NaN / inf and far-away points): very large batches on the CPU paths, where a kernel
indexing with 32 bits or splitting its work badly would go wrong. Compared with tore_reference on sampled rows
(its per-sample loops would take minutes on a million samples)."""
import pytest
import torch

import tore_reference
from tore_kernels.ops import image_token_prune, itp_loss, token_occupancy, weak_perspective_project

BIG = 2**20 + 7  # samples: past 2**20, an odd count


def _rows(n, k=64, seed=0):
    """Up to k + 2 distinct sample indices including the first and the last."""
    picks = torch.randint(0, n, (k,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.tensor([0, n - 1]), picks]).unique()


def test_project_very_large_batch():
    g = torch.Generator().manual_seed(1)
    points, camera = torch.randn(BIG, 3, 3, generator=g), torch.randn(BIG, 3, generator=g)
    out = weak_perspective_project(points, camera)
    assert out.shape == (BIG, 3, 2)
    rows = _rows(BIG)
    # float32, the same two roundings as the reference: bit-identical
    assert torch.equal(out[rows], tore_reference.orthographic_projection(points[rows], camera[rows]))
    # a flat [..., P, 3] with P = 2**22 + 3 points under one camera
    flat = torch.randn(1, 2**22 + 3, 3, generator=g)
    out = weak_perspective_project(flat, camera[:1])
    assert torch.equal(out[0, -5:], tore_reference.orthographic_projection(flat[:, -5:], camera[:1])[0])


def test_occupancy_and_loss_very_large_batch():
    g = torch.Generator().manual_seed(2)
    points2d = torch.rand(BIG, 4, 2, generator=g) * 2.4 - 1.2  # some outside the image
    occupancy = token_occupancy(points2d, (7, 7))
    rows = _rows(BIG)
    assert torch.equal(occupancy[rows], tore_reference.token_occupancy(points2d[rows], (7, 7)))
    n = 2**17 + 3  # the loss's own work is plain torch over [B, N, 49]: a smaller batch keeps memory low
    rows = _rows(n)
    heatmap = torch.rand(n, 1, 49, generator=g)
    has_smpl = torch.zeros(n)
    has_smpl[rows] = 1  # only the sampled rows count: the loss is then checkable against the reference
    loss = itp_loss(heatmap, points2d[:n], has_smpl, (7, 7))
    expected = tore_reference.itp_loss(heatmap[rows].double(), points2d[rows], has_smpl[rows], (7, 7))
    # float32 op over <= 66 * 49 terms in [0, 1] against float64: (n + 4) u relative (see test_properties_ops)
    assert abs(loss.double() - expected) <= (len(rows) * 49 + 4) * 2**-24 * expected


@pytest.mark.parametrize("seq_first", [False, True])
def test_image_token_prune_empty_batch(seq_first):
    """B = 0 is defined by the eager sequence (empty tokens and heatmap) and stays differentiable."""
    ref = tore_reference.ImageTokenPruner(16, 5)
    x = torch.randn(0, 16, 3, 3, requires_grad=True)
    conv, fc, ln = ref.token_selector_conv2d, ref.token_selector_fc, ref.layer_norm
    tokens, heatmap = image_token_prune(x, conv.weight, conv.bias, fc.weight, fc.bias, ln.weight, ln.bias,
                                        seq_first=seq_first)
    ref_tokens, ref_heatmap = ref(x)
    assert tokens.shape == ((5, 0, 16) if seq_first else (0, 5, 16)) and heatmap.shape == ref_heatmap.shape == (0, 5, 9)
    (tokens.sum() + heatmap.sum()).backward()
    assert x.grad.shape == x.shape and conv.weight.grad is not None and not conv.weight.grad.any()
