"""tore_kernels.topology: FastMETRO loaders (real files when present), conversion, faces, smplx, default mesh."""
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tore_kernels.topology import (MeshTopology, convert_fastmetro_npz, default_body_mesh, from_faces, from_smplx,
                                   load_fastmetro)

SMPL_LEVELS = (6890, 1723, 431)
MANO_LEVELS = (778, 195, 49, 13, 4)


def fastmetro_mask(folder, prefix):
    """FastMETRO's own construction: dense adjacency from the .pt files, ``== 0`` blocks."""
    parts = [torch.load(os.path.join(folder, f"{prefix}_{p}.pt"), weights_only=True)
             for p in ("indices", "values", "size")]
    return torch.sparse_coo_tensor(*parts, check_invariants=True).to_dense() == 0


def assert_sparse_equal(a, b):
    assert a.shape == b.shape
    assert torch.equal(a.indices(), b.indices())
    torch.testing.assert_close(a.values(), b.values(), rtol=0, atol=0)


def assert_topology_equal(a, b):
    assert a.num_vertices == b.num_vertices and a.adjacency_level == b.adjacency_level
    assert_sparse_equal(a.adjacency, b.adjacency)
    for x, y in zip(a.upsampling + a.downsampling, b.upsampling + b.downsampling, strict=True):
        assert_sparse_equal(x, y)
    for x, y in zip(a.faces, b.faces, strict=True):
        assert torch.equal(x, y)


def assert_adjacency_invariants(topo, lo, hi):
    dense = topo.adjacency.to_dense()
    counts = topo.neighbour_counts()
    assert torch.equal(dense, dense.t()), "adjacency must be symmetric"
    assert bool(torch.all(dense.diagonal() == 1)), "every vertex needs its self-loop"
    assert set(dense.unique().tolist()) == {0.0, 1.0}
    assert int(counts.min()) == lo and int(counts.max()) == hi
    mask = topo.attention_mask()
    assert mask.dtype == torch.bool and mask.shape == dense.shape
    assert torch.equal((~mask).sum(1), counts)
    return counts


def copy_adjacency(src, dst, prefix="smpl_431_adjmat"):
    for part in ("indices", "values", "size"):
        shutil.copy(os.path.join(src, f"{prefix}_{part}.pt"), dst)


# ---------------------------------------------------------------------------------------------------------
# real FastMETRO files


def test_load_fastmetro_smpl(fastmetro_data):
    topo = load_fastmetro(fastmetro_data, "smpl", trust_pickle=True)
    assert topo.num_vertices == SMPL_LEVELS and topo.adjacency_level == 2
    counts = assert_adjacency_invariants(topo, 4, 11)
    assert counts.float().mean().item() == pytest.approx(6.97, abs=0.005)
    assert torch.equal(topo.attention_mask(), fastmetro_mask(fastmetro_data, "smpl_431_adjmat"))
    for u in topo.upsampling:
        assert torch.equal(torch.bincount(u.indices()[0], minlength=u.shape[0]), torch.full((u.shape[0],), 3))
    assert [tuple(f.shape) for f in topo.faces] == [(13776, 3), (3442, 3), (858, 3)]
    # the coarse faces describe the same graph as the adjacency file
    assert_sparse_equal(from_faces(topo.faces[2], 431).adjacency, topo.adjacency)


def test_load_fastmetro_matches_released_sampler(fastmetro_data):
    from tore_reference.mesh import Mesh
    ref = Mesh.from_fastmetro(os.path.join(fastmetro_data, "mesh_downsampling.npz"))
    topo = load_fastmetro(fastmetro_data, trust_pickle=True)
    for ours, theirs in zip(topo.upsampling + topo.downsampling, ref._U + ref._D, strict=True):
        assert_sparse_equal(ours, theirs)


def test_load_fastmetro_mano(fastmetro_data):
    topo = load_fastmetro(fastmetro_data, "mano", trust_pickle=True)
    assert topo.num_vertices == MANO_LEVELS and topo.adjacency_level == 1
    assert_adjacency_invariants(topo, 3, 11)
    assert torch.equal(topo.attention_mask(), fastmetro_mask(fastmetro_data, "mano_195_adjmat"))


def test_pickle_refused_without_trust(fastmetro_data):
    with pytest.raises(ValueError, match=r"mesh_downsampling\.npz.*pickle.*convert_fastmetro_npz"):
        load_fastmetro(fastmetro_data)


@pytest.mark.parametrize("body, npz", [("smpl", "mesh_downsampling.npz"), ("mano", "mano_downsampling.npz")])
def test_conversion_round_trip(fastmetro_data, tmp_path, body, npz):
    dst = convert_fastmetro_npz(os.path.join(fastmetro_data, npz), tmp_path / "plain.npz")
    with np.load(dst, allow_pickle=False) as data:  # plain arrays only: no object dtype anywhere
        assert all(data[k].dtype != object for k in data.files)
    pickled = load_fastmetro(fastmetro_data, body, trust_pickle=True)
    assert_topology_equal(load_fastmetro(fastmetro_data, body, converted=dst), pickled)


def test_converted_file_next_to_adjacency_is_preferred(fastmetro_data, tmp_path):
    copy_adjacency(fastmetro_data, tmp_path)
    convert_fastmetro_npz(os.path.join(fastmetro_data, "mesh_downsampling.npz"),
                          tmp_path / "mesh_downsampling.plain.npz")
    topo = load_fastmetro(tmp_path)  # no pickled file in this folder, no trust needed
    assert topo.num_vertices == SMPL_LEVELS


def test_missing_files(fastmetro_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_fastmetro(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="smpl_431_adjmat_indices.pt"):
        load_fastmetro(tmp_path, trust_pickle=True)
    copy_adjacency(fastmetro_data, tmp_path)
    with pytest.raises(FileNotFoundError, match="mesh_downsampling.npz"):
        load_fastmetro(tmp_path, trust_pickle=True)
    with pytest.raises(ValueError, match="body"):
        load_fastmetro(fastmetro_data, "smplx")


def test_corrupt_adjacency(fastmetro_data, tmp_path):
    copy_adjacency(fastmetro_data, tmp_path)
    shutil.copy(os.path.join(fastmetro_data, "mesh_downsampling.npz"), tmp_path)
    target = tmp_path / "smpl_431_adjmat_values.pt"
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(ValueError, match="smpl_431_adjmat_values.pt"):
        load_fastmetro(tmp_path, trust_pickle=True)
    torch.save(torch.zeros(7), target)  # readable, but not one value per index
    with pytest.raises(ValueError, match="smpl_431_adjmat_indices.pt"):
        load_fastmetro(tmp_path, trust_pickle=True)


@pytest.mark.parametrize("trust", [True, False])
def test_truncated_npz(fastmetro_data, tmp_path, trust):
    copy_adjacency(fastmetro_data, tmp_path)
    data = open(os.path.join(fastmetro_data, "mesh_downsampling.npz"), "rb").read()
    (tmp_path / "mesh_downsampling.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="mesh_downsampling.npz"):
        load_fastmetro(tmp_path, trust_pickle=trust)


def test_corrupt_converted_file(fastmetro_data, tmp_path):
    dst = convert_fastmetro_npz(os.path.join(fastmetro_data, "mesh_downsampling.npz"), tmp_path / "plain.npz")
    with np.load(dst) as data:
        arrays = {k: data[k] for k in data.files}
    broken = tmp_path / "missing.npz"
    np.savez(broken, **{k: v for k, v in arrays.items() if k != "U1_indices"})
    with pytest.raises(ValueError, match="missing.npz.*U1_indices"):
        load_fastmetro(fastmetro_data, converted=broken)
    arrays["U0_indices"] = arrays["U0_indices"] + 10_000  # column out of range
    np.savez(tmp_path / "range.npz", **arrays)
    with pytest.raises(ValueError, match=r"range.npz: U\[0\]"):
        load_fastmetro(fastmetro_data, converted=tmp_path / "range.npz")
    raw = open(dst, "rb").read()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(ValueError, match="cut.npz"):
        load_fastmetro(fastmetro_data, converted=tmp_path / "cut.npz")


def test_npz_without_fastmetro_keys(fastmetro_data, tmp_path):
    copy_adjacency(fastmetro_data, tmp_path)
    np.savez(tmp_path / "mesh_downsampling.npz", A=np.zeros(3))
    with pytest.raises(ValueError, match="mesh_downsampling.npz.*'U'"):
        load_fastmetro(tmp_path, trust_pickle=True)


def test_convert_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        convert_fastmetro_npz(tmp_path / "absent.npz", tmp_path / "out.npz")
    with pytest.raises(ValueError, match="dst: expected a path ending in .npz"):
        convert_fastmetro_npz(tmp_path / "absent.npz", tmp_path / "out.bin")


# ---------------------------------------------------------------------------------------------------------
# faces and smplx


def test_from_faces_small():
    # a square split along 0-2, plus one isolated vertex 4
    topo = from_faces(np.array([[0, 1, 2], [0, 2, 3]], dtype=np.uint32), num_vertices=5)
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 1, 1, 0], [0, 0, 0, 0, 1]])
    assert torch.equal(topo.adjacency.to_dense(), expected.float())
    assert torch.equal(topo.attention_mask(), expected == 0)
    assert topo.neighbour_counts().tolist() == [4, 3, 4, 3, 1]
    assert topo.num_vertices == (5,) and topo.upsampling == ()


def test_from_faces_tetrahedron_is_complete():
    topo = from_faces(torch.tensor([[0, 1, 2], [0, 3, 1], [1, 3, 2], [0, 2, 3]]))
    assert not topo.attention_mask().any()


@pytest.mark.parametrize("faces, num_vertices, error, match", [
    (np.zeros((2, 3), dtype=np.float32), None, TypeError, "integer"),
    (np.zeros((2, 4), dtype=np.int64), None, ValueError, r"\[F, 3\]"),
    (np.zeros((0, 3), dtype=np.int64), None, ValueError, "non-empty"),
    (np.array([[0, 1, -1]]), None, ValueError, ">= 0"),
    (np.array([[0, 1, 5]]), 4, ValueError, "num_vertices"),
])
def test_from_faces_validation(faces, num_vertices, error, match):
    with pytest.raises(error, match=match):
        from_faces(faces, num_vertices)


def test_from_smplx_stand_in():
    default = default_body_mesh()
    model = SimpleNamespace(faces=default.faces[0].numpy().astype(np.uint32), v_template=torch.zeros(6890, 3))
    topo = from_smplx(model)
    assert topo.num_vertices == (6890,)
    assert_sparse_equal(topo.adjacency, from_faces(default.faces[0]).adjacency)
    with pytest.raises(TypeError, match="faces"):
        from_smplx(SimpleNamespace(v_template=torch.zeros(3, 3)))


@pytest.mark.parametrize("body, npz", [("smpl", "mesh_downsampling.npz"), ("mano", "mano_downsampling.npz")])
def test_from_smplx_with_fastmetro_levels(fastmetro_data, tmp_path, body, npz):
    reference = load_fastmetro(fastmetro_data, body, trust_pickle=True)
    model = SimpleNamespace(faces=reference.faces[0].numpy().astype(np.uint32),
                            v_template=torch.zeros(reference.num_vertices[0], 3))
    with pytest.raises(ValueError, match="pickle"):
        from_smplx(model, os.path.join(fastmetro_data, npz))
    plain = convert_fastmetro_npz(os.path.join(fastmetro_data, npz), tmp_path / "plain.npz")
    topo = from_smplx(model, plain)
    assert_topology_equal(topo, reference)  # adjacency from the coarse faces == FastMETRO's adjacency file


def test_from_smplx_mismatched_file(fastmetro_data):
    model = SimpleNamespace(faces=default_body_mesh().faces[0].numpy(), v_template=torch.zeros(6890, 3))
    with pytest.raises(ValueError, match="other faces"):
        from_smplx(model, os.path.join(fastmetro_data, "mesh_downsampling.npz"), trust_pickle=True)


# ---------------------------------------------------------------------------------------------------------
# the generated default


def test_default_body_mesh_levels_and_degrees():
    topo = default_body_mesh()
    assert topo.num_vertices == SMPL_LEVELS and topo.adjacency_level == 2
    counts = topo.neighbour_counts()
    assert 4 <= int(counts.min()) and int(counts.max()) <= 11
    # a closed genus-0 triangulation has 3V - 6 edges: mean allowed keys = 1 + 2(3V - 6)/V = 6.972 at 431
    assert counts.float().mean().item() == pytest.approx(1 + 2 * (3 * 431 - 6) / 431, abs=1e-5)
    dense = topo.adjacency.to_dense()
    assert torch.equal(dense, dense.t()) and bool(torch.all(dense.diagonal() == 1))
    assert_sparse_equal(from_faces(topo.faces[2], 431).adjacency, topo.adjacency)


@pytest.mark.parametrize("level", [0, 1, 2])
def test_default_body_mesh_is_closed_oriented_genus0(level):
    topo = default_body_mesh()
    n, faces = topo.num_vertices[level], topo.faces[level]
    edges = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    directed = edges[:, 0] * n + edges[:, 1]
    assert directed.unique().numel() == directed.numel(), "a directed edge appears twice: not consistently oriented"
    assert bool(torch.isin(edges[:, 1] * n + edges[:, 0], directed).all()), "an edge has one face only: not closed"
    assert faces.unique().numel() == n
    assert n - directed.numel() // 2 + faces.shape[0] == 2  # Euler characteristic of a sphere


def test_default_body_mesh_matrices():
    topo = default_body_mesh()
    assert [tuple(u.shape) for u in topo.upsampling] == [(6890, 1723), (1723, 431)]
    assert [tuple(d.shape) for d in topo.downsampling] == [(1723, 6890), (431, 1723)]
    for u in topo.upsampling:
        rows = u.indices()[0]
        assert torch.equal(torch.bincount(rows, minlength=u.shape[0]), torch.full((u.shape[0],), 3))
        assert bool(torch.all(u.values() != 0))
        row_sums = torch.zeros(u.shape[0]).index_add_(0, rows, u.values())
        torch.testing.assert_close(row_sums, torch.ones(u.shape[0]), rtol=0, atol=1e-6)
        assert bool(torch.all(torch.bincount(u.indices()[1], minlength=u.shape[1]) > 0)), "a coarse vertex is unused"
    for d in topo.downsampling:
        rows = torch.bincount(d.indices()[0], minlength=d.shape[0])
        assert torch.equal(rows, torch.ones(d.shape[0], dtype=torch.long))
        assert bool(torch.all(d.values() == 1))


def test_default_body_mesh_deterministic_and_cached():
    first = default_body_mesh()
    assert default_body_mesh() is first
    default_body_mesh.cache_clear()
    try:
        assert_topology_equal(default_body_mesh(), first)
    finally:
        default_body_mesh.cache_clear()


def test_topology_validation():
    topo = default_body_mesh()
    with pytest.raises(ValueError, match=r"upsampling\[0\]"):
        MeshTopology(topo.num_vertices, topo.adjacency, 2, (topo.upsampling[1], topo.upsampling[1]))
    with pytest.raises(ValueError, match="adjacency_level"):
        MeshTopology(topo.num_vertices, topo.adjacency, 3)
    no_loops = torch.sparse_coo_tensor(torch.tensor([[0, 1], [1, 0]]), torch.ones(2), (2, 2)).coalesce()
    with pytest.raises(ValueError, match="self-loop"):
        MeshTopology((2,), no_loops, 0)
    with pytest.raises(TypeError, match="adjacency"):
        MeshTopology((2,), torch.eye(2), 0)


def test_garbage_downsampling_file(tmp_path):
    path = tmp_path / "mesh_downsampling.npz"
    path.write_bytes(b"not a zip file")
    model = SimpleNamespace(faces=default_body_mesh().faces[0])
    for trust in (False, True):
        with pytest.raises(ValueError, match="mesh_downsampling.npz"):
            from_smplx(model, path, trust_pickle=trust)
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        from_smplx(model, tmp_path / "absent.npz")
