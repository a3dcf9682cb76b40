"""Weak-perspective projection and the ITP supervision, as the released code computes them
(tore-model.md section 6), loops included."""
import torch


def orthographic_projection(X, camera):
    """X [B, P, 3], camera [B, 3] = (s, tx, ty) -> s * (X[..., :2] + (tx, ty)), [B, P, 2]."""
    camera = camera.view(-1, 1, 3)
    X_trans = X[:, :, :2] + camera[:, :, 1:]
    shape = X_trans.shape
    return (camera[:, :, 0] * X_trans.reshape(shape[0], -1)).view(shape)


def token_occupancy(points2d, grid_size=(7, 7)):
    """points2d [B, P, 2] in [-1, 1] -> [B, G_h, G_w] float, 1 where a point's cell is (row = y, col = x)."""
    grid_h, grid_w = grid_size
    B = points2d.shape[0]
    occupancy = torch.zeros(B, grid_h, grid_w, dtype=points2d.dtype, device=points2d.device)
    gx = (points2d[..., 0] + 1) / 2 * grid_w
    gy = (points2d[..., 1] + 1) / 2 * grid_h
    for b in range(B):
        inside = (gx[b] >= 0) & (gx[b] < grid_w) & (gy[b] >= 0) & (gy[b] < grid_h)
        rows = torch.floor(gy[b][inside]).long()
        cols = torch.floor(gx[b][inside]).long()
        occupancy[b, rows, cols] = 1
    return occupancy


def itp_loss(heatmap, points2d, has_smpl, grid_size=(7, 7)):
    """The released token-reduction loss: per-(sample, cluster) min-max normalised heatmap
    [B, N, H*W] summed where no ground-truth point falls, over samples with has_smpl == 1."""
    grid_h, grid_w = grid_size
    B, N, _ = heatmap.shape
    occupancy = token_occupancy(points2d, grid_size)
    normalised = torch.zeros_like(heatmap)
    for b in range(B):
        for n in range(N):
            m = heatmap[b, n]
            normalised[b, n] = (m - m.min()) / (m.max() - m.min() + 1e-12)
    normalised = normalised.view(B, N, grid_h, grid_w)
    per_sample = (normalised * (1 - occupancy[:, None])).sum(dim=(1, 2, 3))
    return per_sample[has_smpl == 1].sum()
