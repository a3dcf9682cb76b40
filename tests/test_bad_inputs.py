"""Bad input at every public entry point ends in ValueError / TypeError / FileNotFoundError / RuntimeError naming
the argument, never a crash, a hang or a silently wrong result. The cases already checked next to each op
(tests/test_<op>.py) are not repeated here: these are the rest of issue 6's list (complex dtypes, mixed devices
with 'meta' as the second device, batch mismatches, zero-size grids, module constructor arguments, pickle
payloads where plain data was promised, an unusable CLI --out)."""
import math
import os

import numpy as np
import pytest
import torch

from tore_kernels import cli
from tore_kernels.nn import AdjacencyMultiheadAttention, ImageTokenPruner
from tore_kernels.ops import (adjacency_attention, image_token_prune, itp_loss, mesh_upsample, neighbour_table,
                              token_occupancy, weak_perspective_project)
from tore_kernels.topology import convert_fastmetro_npz, from_smplx, load_fastmetro

C64 = torch.complex64


def _itp_args(B=2, C=8, H=3, W=3, N=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    shapes = [(B, C, H, W), (C // 4, C, 3, 3), (C // 4,), (N, C // 4), (N,), (N, C), (N, C)]
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def _table(L=5):
    blocked = torch.ones(L, L, dtype=torch.bool)
    blocked.fill_diagonal_(False)
    blocked[:, 0] = False
    return neighbour_table(blocked)


Q = torch.randn(2, 2, 5, 4)

OP_CASES = [
    # complex and integer dtypes
    (lambda: weak_perspective_project(torch.ones(2, 4, 3, dtype=C64), torch.ones(2, 3, dtype=C64)), TypeError,
     "points: expected float32"),
    (lambda: token_occupancy(torch.ones(2, 4, 2, dtype=C64)), TypeError, "points2d: expected float32"),
    (lambda: itp_loss(torch.ones(2, 3, 49, dtype=C64), torch.ones(2, 5, 2), torch.ones(2)), TypeError,
     "heatmap: expected float32"),
    (lambda: itp_loss(torch.ones(2, 3, 49), torch.ones(2, 5, 2), torch.ones(2, dtype=C64)), TypeError,
     "has_smpl: expected a bool, integer or float tensor"),
    (lambda: image_token_prune(*[t.to(C64) for t in _itp_args()]), TypeError, "features must be float32"),
    (lambda: image_token_prune(_itp_args()[0].long(), *_itp_args()[1:]), TypeError, "features must be float32"),
    (lambda: adjacency_attention(Q.to(C64), Q.to(C64), Q.to(C64), _table()), TypeError, "q must be float16"),
    (lambda: mesh_upsample(torch.ones(2, 4, 3, dtype=C64), [torch.eye(4).to_sparse()]), TypeError,
     "x: expected a floating dtype"),
    # mixed devices ('meta' stands in for a second device on CPU-only machines)
    (lambda: itp_loss(torch.ones(2, 3, 49), torch.ones(2, 5, 2, device="meta"), torch.ones(2)), ValueError,
     "points2d: expected the device of heatmap"),
    (lambda: adjacency_attention(Q, Q.to("meta"), Q.to("meta"), _table()), TypeError, "k must have q's dtype and device"),
    (lambda: ImageTokenPruner(8, 4, grid_size=(3, 3))(torch.randn(2, 8, 3, 3, device="meta")), TypeError,
     "features must be torch.float32 on cpu"),
    # batch / shape mismatches, wrong rank or trailing size
    (lambda: adjacency_attention(Q, Q[:1], Q[:1], _table()), ValueError, r"k and v must be \[B=2, H=2, S, d=4\]"),
    (lambda: adjacency_attention(Q, Q, Q[..., :3], _table()), ValueError, r"k and v must be \[B=2, H=2, S, d=4\]"),
    (lambda: adjacency_attention(Q, Q[:, :1], Q[:, :1], _table()), ValueError, r"k and v must be \[B=2, H=2"),
    (lambda: mesh_upsample(torch.ones(2, 4, 3), [torch.zeros(2, 3, 4).to_sparse()]), ValueError,
     r"matrices\[0\]: expected a 2-D floating matrix"),
    # zero-size grids and inputs
    (lambda: image_token_prune(torch.randn(2, 8, 0, 3), *_itp_args()[1:]), ValueError, "features must have a non-empty grid"),
    (lambda: image_token_prune(torch.randn(2, 8, 3, 0), *_itp_args()[1:]), ValueError, "features must have a non-empty grid"),
    (lambda: itp_loss(torch.ones(2, 3, 0), torch.ones(2, 5, 2), torch.ones(2), (0, 7)), ValueError,
     "grid_size: expected two ints >= 1"),
    (lambda: token_occupancy(torch.ones(2, 4, 2), (True, 7)), ValueError, "grid_size: expected two ints"),
    # masks / tables
    (lambda: neighbour_table([[True, False]]), TypeError, "mask must be a torch.Tensor"),
    (lambda: neighbour_table(torch.zeros(2, 2, dtype=torch.int32)), TypeError, "mask must be bool"),
    (lambda: neighbour_table(torch.zeros(3, 3, dtype=torch.bool), dense_row_degree=2.5), ValueError,
     "dense_row_degree must be a positive int"),
    (lambda: neighbour_table(torch.zeros(3, 3).fill_diagonal_(math.inf)), ValueError, "must not contain NaN or \\+inf"),
    (lambda: adjacency_attention(Q, Q, Q, _table(), scale=-1.0), ValueError, "scale must be a positive finite"),
    (lambda: adjacency_attention(Q, Q, Q, _table(), scale=torch.tensor(0.5)), ValueError,
     "scale must be a positive finite float"),
    # module constructors
    (lambda: AdjacencyMultiheadAttention(10, 3), ValueError, r"embed_dim \(10\) must be divisible by num_heads \(3\)"),
    (lambda: AdjacencyMultiheadAttention(8, 0), ValueError, "num_heads"),
    (lambda: ImageTokenPruner(8, 1, grid_size="ab"), TypeError, "grid_size must be a pair of ints"),
    (lambda: ImageTokenPruner(8, 1, grid_size=None), TypeError, "grid_size must be a pair of ints"),
]


@pytest.mark.parametrize("call, error, match", OP_CASES, ids=range(len(OP_CASES)))
def test_ops_and_modules_reject(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_module_mask_of_the_wrong_shape():
    mha = AdjacencyMultiheadAttention(8, 2).eval()
    x = torch.randn(5, 2, 8)
    blocked = torch.ones(4, 5, dtype=torch.bool)  # [L - 1, S]
    blocked[:, 0] = False
    with pytest.raises(RuntimeError, match="attn_mask"):  # nn.MultiheadAttention's own check and message
        mha(x, x, x, attn_mask=blocked)


@pytest.mark.parametrize("args, error, match", [
    ((torch.randn(5, 2, 6),) * 3, ValueError, "query: expected last dimension embed_dim=8"),
    ((torch.randn(5, 2, 8), torch.randn(5, 2, 6), torch.randn(5, 2, 8)), ValueError, "key: expected last dimension 8"),
    ((torch.randn(5, 2, 8), "k", "v"), TypeError, "key: expected a torch.Tensor"),
])
def test_module_inputs_of_the_wrong_size_or_type(args, error, match):
    with pytest.raises(error, match=match):  # not nn.MultiheadAttention's AssertionError
        AdjacencyMultiheadAttention(8, 2).eval()(*args)


@pytest.mark.parametrize("mask, error, match", [
    (torch.zeros(5, 5, dtype=torch.int64), TypeError, "attn_mask: expected bool"),
    (torch.zeros(5, 5, dtype=torch.bool, device="meta"), ValueError, "attn_mask: expected the device of query"),
    ("mask", TypeError, "attn_mask: expected a torch.Tensor or None"),
])
def test_module_mask_of_the_wrong_dtype_or_device(mask, error, match):
    x = torch.randn(5, 2, 8)
    with pytest.raises(error, match=match):
        AdjacencyMultiheadAttention(8, 2).eval()(x, x, x, attn_mask=mask)


# ---------------------------------------------------------------------------------------------------------
# pickle payloads where plain data was promised: refused, and never unpickled (the payload would create a file)

class _Payload:
    """Unpickling this creates ``path``: proof that a loader ran pickle."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _adjacency_folder(folder, n=3):
    """A minimal valid FastMETRO adjacency (self-loops plus one edge) under its SMPL file names."""
    indices = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 1, 0]])
    torch.save(indices, folder / "smpl_431_adjmat_indices.pt")
    torch.save(torch.ones(indices.shape[1]), folder / "smpl_431_adjmat_values.pt")
    torch.save(torch.Size([n, n]), folder / "smpl_431_adjmat_size.pt")


def test_payload_in_a_plain_npz_is_not_unpickled(tmp_path):
    sentinel = tmp_path / "pwned"
    _adjacency_folder(tmp_path)
    # claims to be convert_fastmetro_npz's output (format_version) but carries an object array
    evil = tmp_path / "evil.npz"
    np.savez(evil, format_version=np.array(1), num_levels=np.array(2),
             U0_indptr=np.array([_Payload(str(sentinel))], dtype=object))
    with pytest.raises(ValueError, match="evil.npz: not a readable plain-array .npz"):
        load_fastmetro(tmp_path, converted=evil)
    model = type("Model", (), {"faces": np.array([[0, 1, 2]], dtype=np.uint32)})()
    with pytest.raises(ValueError, match="evil.npz"):
        from_smplx(model, evil)
    assert not sentinel.exists()


def test_pickled_npz_refused_without_trust(tmp_path):
    sentinel = tmp_path / "pwned"
    _adjacency_folder(tmp_path)
    np.savez(tmp_path / "mesh_downsampling.npz", U=np.array([_Payload(str(sentinel))], dtype=object))
    with pytest.raises(ValueError, match=r"mesh_downsampling.npz stores scipy matrices as pickled objects"):
        load_fastmetro(tmp_path)
    with pytest.raises(ValueError, match="trust_pickle"):  # given as the converted file: still refused
        load_fastmetro(tmp_path, converted=tmp_path / "mesh_downsampling.npz")
    # a raw pickle (not even a zip) under the .npz name
    import pickle
    (tmp_path / "mesh_downsampling.npz").write_bytes(pickle.dumps(_Payload(str(sentinel))))
    with pytest.raises(ValueError, match="mesh_downsampling.npz: not a readable .npz"):
        load_fastmetro(tmp_path)
    assert not sentinel.exists()


def test_payload_in_adjacency_file_is_not_unpickled(tmp_path):
    sentinel = tmp_path / "pwned"
    _adjacency_folder(tmp_path)
    torch.save(_Payload(str(sentinel)), tmp_path / "smpl_431_adjmat_values.pt")
    with pytest.raises(ValueError, match="smpl_431_adjmat_values.pt: could not be read as a torch file"):
        load_fastmetro(tmp_path)
    assert not sentinel.exists()


@pytest.mark.parametrize("content", [b"", b"not a zip file at all", b"PK\x03\x04" + b"\x00" * 40])
def test_convert_rejects_garbage(tmp_path, content):
    src = tmp_path / "broken.npz"
    src.write_bytes(content)
    with pytest.raises(ValueError, match="broken.npz: not a readable .npz"):
        convert_fastmetro_npz(src, tmp_path / "out.npz")
    assert not (tmp_path / "out.npz").exists()


def test_empty_adjacency_file(tmp_path):
    _adjacency_folder(tmp_path)
    (tmp_path / "smpl_431_adjmat_indices.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="smpl_431_adjmat_indices.pt"):
        load_fastmetro(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# CLI

def test_cli_bench_unusable_out_fails_before_running(tmp_path, capsys, monkeypatch):
    pytest.importorskip("tore_benchmarks.harness")
    from tore_benchmarks import harness
    monkeypatch.setattr(harness, "run", lambda *a, **k: pytest.fail("the benchmarks ran with an unusable --out"))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert cli.main(["bench", "--quick", "--out", os.fspath(blocker / "results")]) == cli.EXIT_USAGE
    assert "--out: cannot create the directory" in capsys.readouterr().err
