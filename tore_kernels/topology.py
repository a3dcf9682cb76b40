"""Mesh topology: per-level vertex counts, the token-level adjacency, up/downsampling matrices, faces.

Sources:
  load_fastmetro(folder)   FastMETRO's public data files (adjacency .pt + downsampling .npz)
  from_faces(faces)        a single-level topology from a triangle list (adjacency + self-loops)
  from_smplx(model)        an smplx SMPL / MANO model's faces, optionally with FastMETRO's coarse levels
  default_body_mesh()      a license-free procedural body-like mesh with SMPL's sizes (6890 / 1723 / 431)

Levels go fine -> coarse: ``upsampling[i]`` maps level i+1 to level i, ``downsampling[i]`` level i to
i+1 (FastMETRO's ``U`` / ``D`` convention). Matrices are coalesced sparse COO float32 tensors.
"""
from __future__ import annotations

import functools
import os
import warnings
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

_CONVERTED_VERSION = 1
# FastMETRO's file names per body, and the level its attention runs on (431 SMPL / 195 MANO vertices).
_FASTMETRO_FILES = {
    "smpl": ("smpl_431_adjmat", "mesh_downsampling.npz"),
    "mano": ("mano_195_adjmat", "mano_downsampling.npz"),
}


@dataclass(frozen=True, eq=False)
class MeshTopology:
    """A multi-level mesh. ``adjacency`` is the 0/1 pattern (with self-loops) of level ``adjacency_level``."""

    num_vertices: tuple[int, ...]
    adjacency: torch.Tensor
    adjacency_level: int
    upsampling: tuple[torch.Tensor, ...] = ()
    downsampling: tuple[torch.Tensor, ...] = ()
    faces: tuple[torch.Tensor | None, ...] = ()
    name: str = "mesh"

    def __post_init__(self):
        n = tuple(int(v) for v in self.num_vertices)
        object.__setattr__(self, "num_vertices", n)
        if not n or min(n) < 1:
            raise ValueError(f"num_vertices: expected a non-empty tuple of positive counts, got {n}")
        if not 0 <= self.adjacency_level < len(n):
            raise ValueError(f"adjacency_level: expected 0..{len(n) - 1}, got {self.adjacency_level}")
        va = n[self.adjacency_level]
        _check_sparse("adjacency", self.adjacency, (va, va))
        for name, mats, shape in (("upsampling", self.upsampling, lambda i: (n[i], n[i + 1])),
                                  ("downsampling", self.downsampling, lambda i: (n[i + 1], n[i]))):
            if len(mats) not in (0, len(n) - 1):
                raise ValueError(f"{name}: expected 0 or {len(n) - 1} matrices for {len(n)} levels, got {len(mats)}")
            for i, m in enumerate(mats):
                _check_sparse(f"{name}[{i}]", m, shape(i))
        faces = tuple(self.faces) or (None,) * len(n)
        if len(faces) != len(n):
            raise ValueError(f"faces: expected one entry (or None) per level ({len(n)}), got {len(faces)}")
        for i, f in enumerate(faces):
            if f is not None and (f.dim() != 2 or f.shape[1] != 3 or f.dtype != torch.int64
                                  or (f.numel() and (int(f.min()) < 0 or int(f.max()) >= n[i]))):
                raise ValueError(f"faces[{i}]: expected int64 [F, 3] indices in [0, {n[i]}), "
                                 f"got {f.dtype} {tuple(f.shape)}")
        object.__setattr__(self, "faces", faces)
        if not bool(torch.all(_row_nnz(self.adjacency) > 0)) or not _has_self_loops(self.adjacency):
            raise ValueError("adjacency: every vertex needs its self-loop")

    @property
    def num_levels(self) -> int:
        return len(self.num_vertices)

    def attention_mask(self) -> torch.Tensor:
        """Bool [V, V] at the adjacency level, True = may NOT attend (FastMETRO's ``adjacency == 0``)."""
        return self.adjacency.to_dense() == 0

    def neighbour_counts(self) -> torch.Tensor:
        """int64 [V]: allowed keys per vertex at the adjacency level, the vertex itself included."""
        return _row_nnz(self.adjacency)


def _check_sparse(name, m, shape):
    if not isinstance(m, torch.Tensor) or m.layout != torch.sparse_coo:
        raise TypeError(f"{name}: expected a sparse COO tensor, got {type(m).__name__} "
                        f"{getattr(m, 'layout', '')}")
    if tuple(m.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(m.shape)}")
    if m.dtype != torch.float32 or not m.is_coalesced():
        raise ValueError(f"{name}: expected a coalesced float32 tensor, got {m.dtype}")


def _row_nnz(m: torch.Tensor) -> torch.Tensor:
    return torch.bincount(m.indices()[0], minlength=m.shape[0])


def _has_self_loops(m: torch.Tensor) -> bool:
    i = m.indices()
    return int((i[0] == i[1]).sum()) == m.shape[0]


def _coo(rows, cols, values, shape) -> torch.Tensor:
    idx = torch.as_tensor(np.stack([np.asarray(rows), np.asarray(cols)]).astype(np.int64))
    val = torch.as_tensor(np.asarray(values, dtype=np.float32))
    return torch.sparse_coo_tensor(idx, val, tuple(int(s) for s in shape), check_invariants=False).coalesce()


def _csr_arrays_to_coo(indptr, indices, data, shape, name) -> torch.Tensor:
    """A CSR triple (numpy) as sparse COO float32, validating it (the arrays come from a file)."""
    indptr, indices, data = np.asarray(indptr), np.asarray(indices), np.asarray(data)
    shape = tuple(int(s) for s in np.asarray(shape).ravel())
    if (len(shape) != 2 or indptr.ndim != 1 or indptr.size != shape[0] + 1 or indices.shape != data.shape
            or indptr[0] != 0 or indptr[-1] != indices.size or np.any(np.diff(indptr) < 0)
            or (indices.size and (indices.min() < 0 or indices.max() >= shape[1]))
            or not np.all(np.isfinite(data))):
        raise ValueError(f"{name}: not a valid CSR matrix (shape {shape})")
    rows = np.repeat(np.arange(shape[0]), np.diff(indptr))
    return _coo(rows, indices, data, shape)


def _pattern(m: torch.Tensor) -> torch.Tensor:
    """The 0/1 pattern of a sparse matrix, self-loops added."""
    n = m.shape[0]
    idx = m.coalesce().indices()
    idx = torch.cat([idx, torch.arange(n).repeat(2, 1)], dim=1)
    return torch.sparse_coo_tensor(idx, torch.ones(idx.shape[1]), (n, n), check_invariants=False).coalesce().sign()


def _adjacency_from_faces(faces: torch.Tensor, n: int) -> torch.Tensor:
    e = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    idx = torch.cat([e, e.flip(1)]).t()
    return _pattern(torch.sparse_coo_tensor(idx, torch.ones(idx.shape[1]), (n, n), check_invariants=False))


def _as_faces(faces, name="faces") -> torch.Tensor:
    f = torch.as_tensor(np.asarray(faces) if not isinstance(faces, torch.Tensor) else faces)
    if f.dtype.is_floating_point or f.dtype.is_complex or f.dtype == torch.bool:
        raise TypeError(f"{name}: expected integer vertex indices, got {f.dtype}")
    if f.dim() != 2 or f.shape[1] != 3 or f.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty [F, 3] triangle list, got shape {tuple(f.shape)}")
    f = f.to(device="cpu", dtype=torch.int64)
    if int(f.min()) < 0:
        raise ValueError(f"{name}: vertex indices must be >= 0, got {int(f.min())}")
    return f.contiguous()


def from_faces(faces, num_vertices: int | None = None, name: str = "faces") -> MeshTopology:
    """One-level topology of a triangle mesh: adjacency = shared edges + self-loops.

    ``num_vertices`` defaults to ``max(faces) + 1``; vertices no face uses keep only their self-loop.
    """
    f = _as_faces(faces)
    n = int(f.max()) + 1 if num_vertices is None else int(num_vertices)
    if n <= int(f.max()):
        raise ValueError(f"num_vertices: faces index vertex {int(f.max())}, expected num_vertices > that, got {n}")
    return MeshTopology((n,), _adjacency_from_faces(f, n), 0, faces=(f,), name=name)


def from_smplx(model, downsampling: str | os.PathLike | None = None, trust_pickle: bool = False,
               adjacency_level: int | None = None) -> MeshTopology:
    """Topology of an smplx body model (``smplx.SMPL``, ``smplx.MANO``, ...): anything with ``.faces``.

    Without ``downsampling`` this is the single full-resolution level. With FastMETRO's downsampling file
    (``mesh_downsampling.npz`` / ``mano_downsampling.npz``, or its plain conversion) the coarse levels
    come from the file and the adjacency is built from the faces of ``adjacency_level`` (default: the level
    FastMETRO attends over, 431 vertices for SMPL and 195 for MANO).
    """
    faces = getattr(model, "faces", None)
    if faces is None:
        raise TypeError(f"model: expected an smplx body model with a .faces array, got {type(model).__name__}")
    f = _as_faces(faces, "model.faces")
    v_template = getattr(model, "v_template", None)
    n = int(v_template.shape[-2]) if v_template is not None else int(f.max()) + 1
    name = type(model).__name__.lower()
    if downsampling is None:
        return from_faces(f, n, name=name)
    levels = _load_downsampling(os.fspath(downsampling), trust_pickle)
    if levels["num_vertices"][0] != n or (levels["faces"][0] is not None and not torch.equal(levels["faces"][0], f)):
        raise ValueError(f"downsampling: {downsampling} describes a {levels['num_vertices'][0]}-vertex mesh with "
                         f"other faces than the model ({n} vertices)")
    counts = levels["num_vertices"]
    if adjacency_level is None:
        adjacency_level = {6890: 2, 778: 1}.get(n, len(counts) - 1)
    if not 0 <= adjacency_level < len(counts) or levels["faces"][adjacency_level] is None:
        raise ValueError(f"adjacency_level: expected a level 0..{len(counts) - 1} with faces, got {adjacency_level}")
    adjacency = _adjacency_from_faces(levels["faces"][adjacency_level], counts[adjacency_level])
    return MeshTopology(counts, adjacency, adjacency_level, levels["upsampling"], levels["downsampling"],
                        levels["faces"], name=name)


# ---------------------------------------------------------------------------------------------------------
# FastMETRO files


def _torch_load(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: FastMETRO data file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: could not be read as a torch file (corrupt or truncated?): {exc}") from exc


def _load_adjacency(folder, prefix):
    paths = {part: os.path.join(folder, f"{prefix}_{part}.pt") for part in ("indices", "values", "size")}
    indices, values, size = (_torch_load(paths[p]) for p in ("indices", "values", "size"))
    size = tuple(int(s) for s in size) if isinstance(size, (torch.Size, tuple, list)) else None
    if (size is None or len(size) != 2 or size[0] != size[1] or not isinstance(indices, torch.Tensor)
            or indices.dim() != 2 or indices.shape[0] != 2 or indices.dtype != torch.int64
            or not isinstance(values, torch.Tensor) or values.shape != (indices.shape[1],)
            or (indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= size[0]))):
        raise ValueError(f"{paths['indices']}: not a valid [2, nnz] adjacency for size {size} "
                         f"(with {paths['values']}, {paths['size']})")
    adjacency = torch.sparse_coo_tensor(indices, values.float(), size, check_invariants=False)  # range-checked above
    pattern = _pattern(adjacency)
    if not torch.equal(pattern.indices(), adjacency.coalesce().indices()):
        raise ValueError(f"{paths['indices']}: expected self-loops on every vertex (FastMETRO's format)")
    return pattern


def _load_pickled(path):
    """FastMETRO's npz: object arrays of scipy matrices (runs pickle). Key M is never read (it needs psbody)."""
    try:
        data = np.load(path, allow_pickle=True, encoding="latin1")
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"{path}: not a readable .npz (corrupt or truncated?): {exc}") from exc
    out = {}
    with data:
        for key in ("U", "D", "F"):
            if key not in data.files:
                raise ValueError(f"{path}: missing array {key!r} (found {data.files}); "
                                 "not a FastMETRO downsampling file")
            try:
                with warnings.catch_warnings():  # old pickles name scipy.sparse.csc, deprecated there
                    warnings.simplefilter("ignore", DeprecationWarning)
                    out[key] = list(data[key])
            except ModuleNotFoundError as exc:
                raise ImportError(f"{path}: its pickled matrices need {exc.name} (pip install scipy)") from exc
            except Exception as exc:
                raise ValueError(f"{path}: array {key!r} could not be read (corrupt or truncated?): {exc}") from exc
    levels = {}
    for key in ("U", "D"):
        mats = []
        for i, m in enumerate(out[key]):
            if not hasattr(m, "tocsr"):
                raise ValueError(f"{path}: {key}[{i}] is {type(m).__name__}, expected a scipy sparse matrix")
            m = m.tocsr()
            mats.append((m.indptr, m.indices, m.data, m.shape))
        levels[key] = mats
    levels["F"] = [np.asarray(f) for f in out["F"]]
    return levels


def convert_fastmetro_npz(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """Rewrite FastMETRO's pickled downsampling ``.npz`` as plain arrays that load with ``allow_pickle=False``.

    Reading ``src`` runs pickle (and needs scipy): do this once, on a file you trust. ``dst`` stores each
    matrix as CSR parts ``U{i}_indptr``, ``U{i}_indices``, ``U{i}_data``, ``U{i}_shape`` (same for ``D``)
    and faces ``F{i}``. Returns the path written.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if not dst.endswith(".npz"):
        raise ValueError(f"dst: expected a path ending in .npz (numpy appends it otherwise), got {dst}")
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{src}: FastMETRO downsampling file not found")
    levels = _load_pickled(src)
    arrays = {"format_version": np.array(_CONVERTED_VERSION), "num_levels": np.array(len(levels["F"]))}
    for key in ("U", "D"):
        for i, (indptr, indices, data, shape) in enumerate(levels[key]):
            arrays.update({f"{key}{i}_indptr": indptr.astype(np.int64), f"{key}{i}_indices": indices.astype(np.int64),
                           f"{key}{i}_data": data.astype(np.float64), f"{key}{i}_shape": np.array(shape, np.int64)})
    for i, f in enumerate(levels["F"]):
        arrays[f"F{i}"] = f.astype(np.int64)
    np.savez(dst, **arrays)
    return dst


def _read_converted(path):
    try:
        data = np.load(path, allow_pickle=False)
        with data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"{path}: not a readable plain-array .npz (corrupt or truncated?): {exc}") from exc
    if int(arrays.get("format_version", -1)) != _CONVERTED_VERSION or "num_levels" not in arrays:
        raise ValueError(f"{path}: not written by convert_fastmetro_npz (format_version {_CONVERTED_VERSION})")
    n = int(arrays["num_levels"])
    try:
        return {
            key: [tuple(arrays[f"{key}{i}_{p}"] for p in ("indptr", "indices", "data", "shape")) for i in range(n - 1)]
            for key in ("U", "D")
        } | {"F": [arrays[f"F{i}"] for i in range(n)]}
    except KeyError as exc:
        raise ValueError(f"{path}: missing array {exc.args[0]!r} (truncated conversion?)") from exc


def _load_downsampling(path, trust_pickle):
    """Levels from a converted (plain) file, or from FastMETRO's pickled one when trusted."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: FastMETRO downsampling file not found")
    plain = _is_plain_npz(path)
    if not plain and not trust_pickle:
        raise ValueError(
            f"{path} stores scipy matrices as pickled objects; loading it runs pickle, which can execute "
            "arbitrary code. If you trust the file, pass trust_pickle=True, or convert it once with "
            "tore_kernels.topology.convert_fastmetro_npz(src, dst) and load the converted file (no pickle).")
    raw = _read_converted(path) if plain else _load_pickled(path)
    ups = [_csr_arrays_to_coo(*m, name=f"{path}: U[{i}]") for i, m in enumerate(raw["U"])]
    downs = [_csr_arrays_to_coo(*m, name=f"{path}: D[{i}]") for i, m in enumerate(raw["D"])]
    if not ups or len(ups) != len(downs) or len(raw["F"]) != len(ups) + 1:
        raise ValueError(f"{path}: expected L-1 U and D matrices and L face lists, got "
                         f"{len(ups)} / {len(downs)} / {len(raw['F'])}")
    counts = [ups[0].shape[0]] + [u.shape[1] for u in ups]
    for i in range(len(ups)):
        if tuple(ups[i].shape) != (counts[i], counts[i + 1]) or tuple(downs[i].shape) != (counts[i + 1], counts[i]):
            raise ValueError(f"{path}: U[{i}] {tuple(ups[i].shape)} and D[{i}] {tuple(downs[i].shape)} do not "
                             f"chain between levels of {counts[i]} and {counts[i + 1]} vertices")
    faces = []
    for i, f in enumerate(raw["F"]):
        f = torch.as_tensor(np.asarray(f).astype(np.int64))
        if f.dim() != 2 or f.shape[1] != 3 or (f.numel() and (int(f.min()) < 0 or int(f.max()) >= counts[i])):
            raise ValueError(f"{path}: F[{i}] is not a [F, 3] face list of a {counts[i]}-vertex level")
        faces.append(f)
    return {"num_vertices": tuple(counts), "upsampling": tuple(ups), "downsampling": tuple(downs),
            "faces": tuple(faces)}


def _is_plain_npz(path):
    try:
        with zipfile.ZipFile(path) as z:
            return "format_version.npy" in z.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"{path}: not a readable .npz (corrupt or truncated?): {exc}") from exc


def load_fastmetro(folder: str | os.PathLike, body: str = "smpl", trust_pickle: bool = False,
                   converted: str | os.PathLike | None = None) -> MeshTopology:
    """FastMETRO's topology from its data folder (``smpl_431_adjmat_*.pt`` + ``mesh_downsampling.npz``, or
    ``mano_195_adjmat_*.pt`` + ``mano_downsampling.npz``).

    The adjacency loads with ``torch.load(weights_only=True)``. The downsampling file needs pickle: it is
    refused unless ``trust_pickle=True``. A plain conversion (``convert_fastmetro_npz``) is used instead
    when given as ``converted`` or when ``<name>.plain.npz`` sits next to the original in ``folder``.
    """
    if body not in _FASTMETRO_FILES:
        raise ValueError(f"body: expected one of {sorted(_FASTMETRO_FILES)}, got {body!r}")
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: FastMETRO data folder not found")
    prefix, npz = _FASTMETRO_FILES[body]
    adjacency = _load_adjacency(folder, prefix)
    if converted is None:
        candidate = os.path.join(folder, npz[:-len(".npz")] + ".plain.npz")
        converted = candidate if os.path.isfile(candidate) else None
    levels = _load_downsampling(os.fspath(converted) if converted is not None else os.path.join(folder, npz),
                                trust_pickle)
    counts = levels["num_vertices"]
    if adjacency.shape[0] not in counts:
        raise ValueError(f"{prefix}_size.pt: a {adjacency.shape[0]}-vertex adjacency matches no level of "
                         f"{npz} {counts}")
    return MeshTopology(counts, adjacency, counts.index(adjacency.shape[0]), levels["upsampling"],
                        levels["downsampling"], levels["faces"], name=f"fastmetro-{body}")


# ---------------------------------------------------------------------------------------------------------
# The license-free default: a body-like surface of revolution, triangulated ring by ring.

_DEFAULT_COUNTS = (6890, 1723, 431)
_DEFAULT_RINGS = (96, 48, 24)


def _body_profile(t):
    """Half-widths (x, z) and height y of the body at parameter t in [0, 1] (head top -> feet), metres."""
    t = np.asarray(t, dtype=np.float64)

    def bump(c, w):
        return np.exp(-((t - c) / w) ** 2)

    cap = np.sqrt(np.clip(np.sin(np.pi * t), 0.0, None))  # closes smoothly at both ends
    x = cap * (0.09 + 0.11 * bump(0.30, 0.10) + 0.08 * bump(0.50, 0.10) + 0.05 * bump(0.62, 0.08)
               - 0.05 * bump(0.14, 0.03) + 0.02 * bump(0.07, 0.05))
    z = cap * (0.08 + 0.04 * bump(0.32, 0.12) + 0.04 * bump(0.55, 0.10) - 0.04 * bump(0.14, 0.03))
    y = 0.85 - 1.7 * t
    return x, z, y


def _ring_sizes(count, rings):
    """Vertices per ring (3 at both caps) proportional to the ring's circumference, summing to ``count``."""
    t = (np.arange(rings) + 0.5) / rings
    x, z, _ = _body_profile(t)
    circ = np.pi * (3 * (x + z) - np.sqrt((3 * x + z) * (x + 3 * z)))  # Ramanujan's ellipse perimeter
    # deterministic ring-to-ring size variation (strongest mid-body) spreads the vertex degrees like SMPL's
    circ = circ[1:-1] * (1 + 0.35 * np.sin(np.pi * t[1:-1]) ** 2 * np.sin(2.39 * np.arange(rings - 2)))
    inner = circ / circ.sum() * (count - 6)
    sizes = np.maximum(np.floor(inner).astype(np.int64), 4)
    order = np.argsort(-(inner - np.floor(inner)), kind="stable")  # hand out the remainder deterministically
    k = 0
    while sizes.sum() != count - 6:
        i = order[k % order.size]
        sizes[i] += 1 if sizes.sum() < count - 6 else (-1 if sizes[i] > 4 else 0)
        k += 1
    return t, np.concatenate([[3], sizes, [3]])


def _ring_mesh(count, rings, phase):
    """Positions, ring index per vertex, ring parameters and outward-oriented faces of one level."""
    t, sizes = _ring_sizes(count, rings)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    theta = np.concatenate([(np.arange(n) + 0.5 * (j % 2) + phase) * (2 * np.pi / n) for j, n in enumerate(sizes)])
    ring = np.repeat(np.arange(rings), sizes)
    x, z, y = _body_profile(t[ring])
    pos = np.stack([x * np.cos(theta), y, z * np.sin(theta)], axis=1)
    faces = [[0, 2, 1]]
    for j in range(rings - 1):  # zip ring j to ring j+1 in order of angle
        a0, m, b0, n = int(starts[j]), int(sizes[j]), int(starts[j + 1]), int(sizes[j + 1])
        ta, tb = theta[a0:a0 + m].tolist(), theta[b0:b0 + n].tolist()  # python floats: this loop is scalar
        i = k = 0
        while i < m or k < n:
            next_a = ta[(i + 1) % m] + 2 * np.pi * ((i + 1) // m)
            next_b = tb[(k + 1) % n] + 2 * np.pi * ((k + 1) // n)
            if k == n or (i < m and next_a <= next_b):
                faces.append([a0 + i % m, a0 + (i + 1) % m, b0 + k % n])
                i += 1
            else:
                faces.append([a0 + i % m, b0 + (k + 1) % n, b0 + k % n])
                k += 1
    last = int(starts[rings - 1])
    faces.append([last, last + 1, last + 2])
    return pos, ring, t, np.asarray(faces, dtype=np.int64)


def _barycentric_upsampling(fine, coarse):
    """Each fine vertex as barycentric weights (3 per row, sum 1) of the coarse face that contains it best.

    Candidates are the coarse faces of the ring bands around the fine vertex (bodies of revolution make
    that enough), the 6 nearest by centroid; the pick maximises the smallest weight.
    """
    (fpos, fring, ft, _), (cpos, cring, ct, cfaces) = fine, coarse
    band_of_face = np.minimum(cring[cfaces].min(1), len(ct) - 2)
    band_of_vertex = np.clip(np.searchsorted(ct, ft[fring]) - 1, 0, len(ct) - 2)
    centroid = cpos[cfaces].mean(1)
    near = np.empty((fpos.shape[0], 6), dtype=np.int64)
    for j in np.unique(band_of_vertex):  # numpy, single-threaded: these blocks are too small for threads
        rows = np.nonzero(band_of_vertex == j)[0]
        faces = np.nonzero(np.abs(band_of_face - j) <= 1)[0]
        d = ((fpos[rows, None, :] - centroid[None, faces, :]) ** 2).sum(-1)
        near[rows] = faces[np.argpartition(d, near.shape[1], axis=1)[:, :near.shape[1]]]
    a, b, c = np.moveaxis(cpos[cfaces[near]], 2, 0)  # [V, K, 3] each
    e0, e1, ep = b - a, c - a, fpos[:, None, :] - a
    d00, d01, d11 = (e0 * e0).sum(-1), (e0 * e1).sum(-1), (e1 * e1).sum(-1)
    d20, d21 = (ep * e0).sum(-1), (ep * e1).sum(-1)
    den = d00 * d11 - d01 * d01
    wb = (d11 * d20 - d01 * d21) / den
    wc = (d00 * d21 - d01 * d20) / den
    w = np.stack([1 - wb - wc, wb, wc], -1)  # barycentrics of the point projected onto each face plane
    rows = np.arange(fpos.shape[0])
    best = w.min(-1).argmax(1)
    w, cols = w[rows, best], cfaces[near[rows, best]]
    return _coo(np.repeat(rows, 3), cols.reshape(-1), w.reshape(-1), (fpos.shape[0], cpos.shape[0]))


@functools.lru_cache(maxsize=1)
def default_body_mesh() -> MeshTopology:
    """A license-free, procedurally generated closed body-like mesh with SMPL's level sizes.

    Levels 6890 / 1723 / 431 vertices (closed genus-0 triangulations, like SMPL's, so the mean degree
    matches: 6.97 allowed keys per coarse vertex), upsampling 6890x1723 and 1723x431 with 3 barycentric
    weights per row summing to 1, downsampling that picks the nearest finer vertex. Deterministic, no
    files; built once and cached (do not modify the returned tensors in place).
    """
    meshes = [_ring_mesh(n, r, phase=0.15 * level) for level, (n, r) in enumerate(zip(_DEFAULT_COUNTS, _DEFAULT_RINGS))]
    ups = tuple(_barycentric_upsampling(fine, coarse) for fine, coarse in zip(meshes[:-1], meshes[1:]))
    downs = []
    for u in ups:  # each coarse vertex picks the finer vertex it weighs most in (its nearest, in practice)
        (row, col), val = u.indices().numpy(), u.values().numpy()
        order = np.lexsort((-val, col))
        first = order[np.r_[True, col[order][1:] != col[order][:-1]]]
        if first.size != u.shape[1] or not np.all(val[first] > 0):
            raise RuntimeError("default_body_mesh: a coarse vertex feeds no finer vertex")
        downs.append(_coo(np.arange(u.shape[1]), row[first], np.ones(u.shape[1]), (u.shape[1], u.shape[0])))
    faces = tuple(torch.from_numpy(m[3]) for m in meshes)
    adjacency = _adjacency_from_faces(faces[-1], _DEFAULT_COUNTS[-1])
    return MeshTopology(_DEFAULT_COUNTS, adjacency, len(_DEFAULT_COUNTS) - 1, ups, tuple(downs), faces,
                        name="default-body")
