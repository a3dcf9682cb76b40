"""Thread safety and determinism of the CPU paths: modules and ops called from several Python threads at once
(cold caches included: the mask -> neighbour-table cache, the mesh_upsample matrix cache) give exactly the
single-threaded results, and the same call gives bit-identical results run to run and at any torch thread count.
"""
import math
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

import tore_reference
from tore_kernels import backend
from tore_kernels.nn import AdjacencyMultiheadAttention, ImageTokenPruner
from tore_kernels.ops import (adjacency_attention, itp_loss, mesh_upsample, neighbour_table, token_occupancy,
                              weak_perspective_project)
from tore_kernels.topology import default_body_mesh

THREADS = 4


def in_threads(fn, n=THREADS):
    """fn(i) for i < n, from n threads released together by a barrier; their results in order."""
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def assert_identical(a, b):
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_identical(x, y)
    elif a is None:
        assert b is None
    else:
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), "results differ"


def sparse_graph(n, seed, extra=2):
    """Allowed [n, n]: self-loops, a ring, a few random edges, symmetric (sparse enough for the fast path)."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.eye(n, dtype=torch.bool) | torch.eye(n, dtype=torch.bool).roll(1, 1)
    rows, cols = torch.randint(0, n, (2, extra * n), generator=g)
    allowed[rows, cols] = True
    return allowed | allowed.T


@pytest.fixture
def mha_pair():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4).eval()
    return mha, AdjacencyMultiheadAttention.from_module(mha)


def test_module_same_mask_from_threads_cold_cache(mha_pair):
    mha, fast = mha_pair
    blocked = ~sparse_graph(96, 0)
    xs = [torch.randn(96, 2, 32, generator=torch.Generator().manual_seed(i)) for i in range(THREADS)]
    assert fast._sparse_table(xs[0], xs[0], xs[0], None, False, blocked.clone(), False) is not None
    mask = blocked.clone()  # a tensor the table cache has never seen: every thread races to build its table

    def run(i):
        with torch.no_grad():  # grad mode is per thread
            return fast(xs[i], xs[i], xs[i], attn_mask=mask)

    threaded = in_threads(run)
    with torch.no_grad():
        single = [run(i) for i in range(THREADS)]
        for got, want, x in zip(threaded, single, xs):
            assert_identical(got, want)
            # and the fast path is nn.MultiheadAttention's result (float32: 2e-5, as in test_adjacency_attention)
            ref = mha(x, x, x, attn_mask=blocked)
            torch.testing.assert_close(got[0], ref[0], atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(got[1], ref[1], atol=2e-6, rtol=2e-5)


def test_neighbour_table_from_threads_cold_cache():
    allowed = sparse_graph(200, 1, extra=6)
    allowed[:, :14] = True  # shared columns
    allowed[5] = True  # a dense row
    for trial in range(3):
        mask = ~allowed.clone()
        tables = in_threads(lambda i: neighbour_table(mask))
        for t in tables:
            assert torch.equal(t.allowed(), allowed)
        assert neighbour_table(mask) in tables  # the cache keeps one of them


def test_adjacency_attention_from_threads_with_gradients():
    allowed = sparse_graph(64, 2)
    mask = ~allowed
    B, H, d = 2, 3, 8

    def run(i):
        g = torch.Generator().manual_seed(i)
        q, k, v = (torch.randn(B, H, 64, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
        out = adjacency_attention(q, k, v, neighbour_table(mask))
        return (out.detach(), *torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))

    threaded = in_threads(run)
    for i, got in enumerate(threaded):
        assert_identical(got, run(i))


def test_mesh_upsample_from_threads_cold_cache():
    mesh = default_body_mesh()
    xs = [torch.randn(3, 431, 3, generator=torch.Generator().manual_seed(i)) for i in range(THREADS)]
    for trial in range(2):
        # fresh matrix tensors: the prepared-chain cache is cold for them
        mats = [m.clone() for m in (mesh.upsampling[1], mesh.upsampling[0])]
        filters = list(warnings.filters)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            threaded = in_threads(lambda i: mesh_upsample(xs[i], mats))
        # the preparation silences torch's CSR beta warning by swapping the global filters: never seen here
        assert not [w for w in caught if "Sparse CSR" in str(w.message)]
        assert warnings.filters == filters
        for got, x in zip(threaded, xs):
            assert_identical(got, mesh_upsample(x, mats))
            want = tore_reference.Mesh._apply(x.double(), [m.double() for m in mats])
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)  # float32 compute


def test_projection_ops_and_pruner_from_threads():
    g = torch.Generator().manual_seed(3)
    points, camera = torch.randn(64, 431, 3, generator=g), torch.randn(64, 3, generator=g)
    heatmap, has_smpl = torch.randn(64, 20, 49, generator=g), torch.ones(64)
    torch.manual_seed(0)
    pruner = ImageTokenPruner(32, 20, grid_size=(7, 7)).eval()
    features = torch.randn(4, 32, 7, 7, generator=g)

    def run(i):
        p2d = weak_perspective_project(points * (i + 1), camera)
        with torch.no_grad():
            return p2d, token_occupancy(p2d), itp_loss(heatmap, p2d, has_smpl), pruner(features * (i + 1))

    threaded = in_threads(run)
    for i, got in enumerate(threaded):
        assert_identical(got, run(i))


# ---------------------------------------------------------------------------------------------------------
# determinism: run to run, and across torch's intra-op thread counts

@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _everything():
    """Every op's CPU path, forward and backward, on fixed inputs."""
    g = torch.Generator().manual_seed(4)
    points = torch.randn(256, 431, 3, generator=g, requires_grad=True)
    camera = torch.randn(256, 3, generator=g, requires_grad=True)
    p2d = weak_perspective_project(points, camera)
    heatmap = torch.randn(256, 20, 49, generator=g, requires_grad=True)
    loss = itp_loss(heatmap, p2d.detach(), torch.ones(256))
    q, k, v = (torch.randn(4, 4, 300, 16, generator=g, requires_grad=True) for _ in range(3))
    attn = adjacency_attention(q, k, v, neighbour_table(~sparse_graph(300, 5)))
    x = torch.randn(16, 431, 3, generator=g, requires_grad=True)
    up = mesh_upsample(x, [default_body_mesh().upsampling[1]])
    grads = torch.autograd.grad((p2d.square().sum(), loss, attn.square().sum(), up.square().sum()),
                                (points, camera, heatmap, q, k, v, x))
    return (p2d.detach(), token_occupancy(p2d.detach()), loss.detach(), attn.detach(), up.detach(), *grads)


def test_cpu_paths_are_deterministic(torch_threads):
    if not backend.HAS_EXTENSION:
        pytest.skip("tore_kernels._C is not built")
    first = _everything()
    assert_identical(_everything(), first)  # run to run
    for n in (1, 2, 3):  # and whatever the split of the work between threads
        torch.set_num_threads(n)
        assert_identical(_everything(), first)
