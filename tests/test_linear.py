"""tore_kernels.ops.linear: packed-weight inference linears against F.linear, and their per-parameter cache."""
import gc
import importlib
import platform

import pytest
import torch
import torch.nn.functional as F
from isa_clones import run_under_clone

from tore_kernels import backend

lin = importlib.import_module("tore_kernels.ops.linear")
packs = pytest.mark.skipif(not (lin._MKL or lin._ONEDNN), reason="torch without MKL or oneDNN packed-linear ops")


FP32_GEMM = lin.fp32_gemm


@pytest.fixture(autouse=True)
def packs_from_two_rows(monkeypatch):
    """This CPU's packed path at these tests' sizes (MKL capped at AVX2 waits for 1024 rows: test_fp32_gemm_per_cpu)."""
    monkeypatch.setattr(lin, "fp32_gemm", lambda: (FP32_GEMM()[0], 2))


def _packed_entries(weight):
    return [k for k in lin._DERIVED.copy() if k[0] == id(weight) and k[1].startswith(("onednn", "mkl"))]


def _big(seed, out=512, rows=90, k=256):
    """A weight and an input large enough for the packed path (rows x k x out over ``SMALL_PRODUCT``)."""
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(out, k, generator=g)), torch.randn(rows, k, generator=g)


@packs
@pytest.mark.parametrize("rows", [None, (0, 256), (256, 512)])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mkl", [True, False], ids=["mkl", "onednn"])
def test_matches_f_linear(rows, relu, bias, mkl, monkeypatch):
    if mkl and not lin._MKL or not mkl and not lin._ONEDNN:
        pytest.skip("torch without " + ("MKL" if mkl else "oneDNN"))
    monkeypatch.setattr(lin, "fp32_gemm", lambda: ("mkl" if mkl else "onednn", 2))  # each, whatever this CPU picks
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(512, 256, generator=g))
    b = torch.nn.Parameter(torch.randn(512, generator=g)) if bias else None
    x = torch.randn(30, 3, 256, generator=g).transpose(0, 1)  # 3-D and not contiguous, as attention inputs are
    lo, hi = rows or (0, 512)
    want = F.linear(x, w[lo:hi], None if b is None else b[lo:hi])
    want = want.relu() if relu else want
    with torch.no_grad():
        got = lin.linear(x, w, b, rows=rows, relu=relu)
    assert [k for k in _packed_entries(w) if k[1].startswith("mkl" if mkl else "onednn")], \
        "the inference call did not take the packed path"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@packs
@pytest.mark.parametrize("gemm", ["mkl", "onednn"])
@pytest.mark.parametrize("rows,k,out", [(1, 2048, 2048), (14, 128, 128), (40, 512, 128)],
                         ids=["one-row", "small-weight", "small-product"])
def test_small_products_run_f_linear(rows, k, out, gemm, monkeypatch):
    # where a packed GEMM's fixed cost exceeds what it saves (see SMALL_PRODUCT), linear is F.linear itself (unless
    # few_rows_linear applies: test_linear_runs_few_rows_where_it_applies)
    monkeypatch.setattr(lin, "fp32_gemm", lambda: (gemm, 2))
    monkeypatch.setattr(lin, "FEW_ROWS", {})
    w, x = _big(6, out=out, rows=rows, k=k)
    with torch.no_grad():
        assert torch.equal(lin.linear(x, w, relu=True), F.linear(x, w).relu())
    assert not _packed_entries(w)


@pytest.mark.parametrize("rows,k,out,mkl,onednn", [(431, 128, 128, False, True), (14, 512, 512, False, True),
                                                   (14, 128, 512, False, False), (14, 512, 2048, True, True)])
def test_small_product_rule_per_gemm(rows, k, out, mkl, onednn):
    # oneDNN's fixed cost is lower than MKL's: it packs small weights with many rows and few rows of larger weights
    assert (not lin._small(rows * k, k, out, "mkl"), not lin._small(rows * k, k, out, "onednn")) == (mkl, onednn)


@pytest.mark.skipif(not lin._MKL, reason="torch without MKL")
def test_mkl_packs_per_row_count_up_to_a_limit(monkeypatch):
    monkeypatch.setattr(lin, "fp32_gemm", lambda: ("mkl", 2))
    w, x = _big(7)
    with torch.no_grad():
        for m in range(90, 90 + lin.MAX_PACKED_ROWS + 2):  # batch shapes beyond the limit run F.linear
            xm = torch.randn(m, x.shape[1])
            torch.testing.assert_close(lin.linear(xm, w), F.linear(xm, w), rtol=1e-5, atol=1e-4)
    (key,) = _packed_entries(w)
    packs = lin._DERIVED[key][2]
    assert sorted(m for m in packs if m != "rows") == list(range(90, 90 + lin.MAX_PACKED_ROWS))


@packs
def test_cache_follows_the_parameter():
    w, x = _big(8)
    with torch.no_grad():
        lin.linear(x, w)
        w.mul_(2)  # in place: a new version
        torch.testing.assert_close(lin.linear(x, w), x @ w.t(), rtol=1e-5, atol=1e-4)
        w.data = torch.randn(w.shape)  # a new storage
        torch.testing.assert_close(lin.linear(x, w), x @ w.t(), rtol=1e-5, atol=1e-4)
    assert len(_packed_entries(w)) == 1
    key = _packed_entries(w)[0]
    del w
    gc.collect()
    assert key not in lin._DERIVED  # dropped with the parameter


def test_autograd_takes_f_linear():
    g = torch.Generator().manual_seed(1)
    w = torch.nn.Parameter(torch.randn(12, 6, generator=g))
    b = torch.nn.Parameter(torch.randn(12, generator=g))
    x = torch.randn(5, 6, generator=g, requires_grad=True)
    got = lin.linear(x, w, b, rows=(2, 10), relu=True)
    want = F.linear(x, w[2:10], b[2:10]).relu()
    gy = torch.randn(want.shape, generator=g)
    for a, e in zip(torch.autograd.grad(got, (x, w, b), gy), torch.autograd.grad(want, (x, w, b), gy)):
        torch.testing.assert_close(a, e)


@packs
@pytest.mark.skipif(not lin.bf16_native(), reason="this CPU has no native bf16: bf16 weights are not packed "
                    "(test_bf16_not_packed_without_native_bf16)")
def test_bf16_autocast_and_inference_mode():
    g = torch.Generator().manual_seed(2)
    w, b = torch.nn.Parameter(torch.randn(32, 64, generator=g)), torch.nn.Parameter(torch.randn(32, generator=g))
    x = torch.randn(10, 64, generator=g)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_rows = lin.linear(x, w, b), lin.linear(x, w, b, rows=(8, 24))
        want, want_rows = F.linear(x, w, b), F.linear(x, w[8:24], b[8:24])
    assert got.dtype == want.dtype == got_rows.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(got_rows.float(), want_rows.float(), rtol=2e-2, atol=5e-2)
    # the cache made under inference_mode still serves (and training still runs F.linear) outside it
    with torch.no_grad():
        lin.linear(x, w, b)
    lin.linear(x, w, b).sum().backward()
    assert w.grad is not None


def test_without_mkl_or_onednn_is_f_linear(monkeypatch):
    monkeypatch.setattr(lin, "_MKL", False)
    monkeypatch.setattr(lin, "fp32_gemm", FP32_GEMM.__wrapped__)  # decided again without MKL: oneDNN's, if enabled
    w, x = _big(9)
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        assert torch.equal(lin.linear(x, w, relu=True), F.linear(x, w).relu())
    assert not _packed_entries(w)


@packs
def test_bf16_not_packed_without_native_bf16(monkeypatch):
    # where oneDNN would refuse to pack bf16 weights ("bf16 path needs the cpu support avx_ne_convert or
    # avx512bw..."), linear runs F.linear under autocast (bf16 emulated, as torch does) and packs only fp32
    monkeypatch.setattr(lin, "bf16_native", lambda: False)
    w, x = _big(4)
    b = torch.nn.Parameter(torch.randn(w.shape[0]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = lin.linear(x, w, b, relu=True)
        want = F.linear(x, w, b).relu()
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert not [k for k in lin._DERIVED.copy() if k[0] == id(w) and "bfloat16" in k[1]]
    with torch.no_grad():
        lin.linear(x, w, b)  # fp32 still packs
    assert _packed_entries(w)


def test_traceable_under_compile():
    # under torch.compile linear is F.linear (inductor packs weights itself): it compiles with fullgraph=True and
    # gives F.linear's numbers, where the packed oneDNN op failed ("weight must be a graph constant")
    g = torch.Generator().manual_seed(5)
    w, b = torch.nn.Parameter(torch.randn(24, 16, generator=g)), torch.nn.Parameter(torch.randn(24, generator=g))
    x = torch.randn(3, 16, generator=g)
    compiled = torch.compile(lambda t: lin.linear(t, w, b, rows=(4, 20), relu=True), fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), F.linear(x, w[4:20], b[4:20]).relu(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vendor", ["GenuineIntel", "AuthenticAMD", None])
def test_fp32_gemm_per_cpu(vendor, monkeypatch):
    # measured: MKL's packed GEMM beats F.linear on Intel's CPUs from a few rows with AVX-512, only for batched rows
    # at AVX2; elsewhere MKL leaves AVX-512 unused and oneDNN's is faster (and the one there is without MKL)
    monkeypatch.setattr(lin.backend, "cpu_vendor", lambda: vendor)
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    if vendor == "GenuineIntel" and lin._MKL:
        assert FP32_GEMM.__wrapped__() == ("mkl", 2 if avx512 else 1024)
    else:
        assert FP32_GEMM.__wrapped__() == ("onednn" if lin._ONEDNN else "mkl" if lin._MKL else None,
                                           2 if lin._ONEDNN or not lin._MKL or avx512 else 1024)
    monkeypatch.setattr(lin, "_MKL", False)
    monkeypatch.setattr(lin, "_ONEDNN", False)
    assert FP32_GEMM.__wrapped__() == (None, 2)


def test_cpu_vendor_reads_this_cpu():
    vendor = lin.backend.cpu_vendor()
    if platform.machine() in ("x86_64", "AMD64"):
        assert vendor in ("GenuineIntel", "AuthenticAMD", "HygonGenuine", "CentaurHauls"), vendor


needs_few_rows = pytest.mark.skipif(not lin.HAS_FEW_ROWS, reason="extension without few_rows_linear")
FEW_ROWS_CASES = dict(m=[1, 2, 7, 14, 15, 16, 29, 40], kn=[(128, 32), (33, 96), (2048, 64)])


def _few_rows_args(m, k, n, bias, seed=0):
    """x [m, k], weight [n, k] and bias [n] or None. x covers both ways the op takes it: contiguous for even m (read in
    place; copied to padded rows for k = 2048, whose rows are 8 KB apart) and a transposed view for odd m > 1
    (copied)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(k, m, generator=g).t() if m % 2 else torch.randn(m, k, generator=g)
    return x, torch.randn(n, k, generator=g), torch.randn(n, generator=g) if bias else None


@needs_few_rows
@pytest.mark.parametrize("m", FEW_ROWS_CASES["m"])
@pytest.mark.parametrize("k,n", FEW_ROWS_CASES["kn"])
@pytest.mark.parametrize("bias,relu", [(True, False), (False, True)])
def test_few_rows_linear_against_float64(m, k, n, bias, relu):
    x, w, b = _few_rows_args(m, k, n, bias)
    packed = lin.pack_few_rows_weight(w)
    out = torch.ops.tore_kernels.few_rows_linear(x, packed, b, relu)
    assert out.shape == (m, n) and out.dtype == torch.float32
    b64 = None if b is None else b.double()
    want = F.linear(x.double(), w.double(), b64)
    # fp32 summation of k + 1 terms errs by at most (k + 1) u times the sum of their magnitudes (u = 2^-24)
    bound = (k + 1) * 2.0 ** -24 * F.linear(x.double().abs(), w.double().abs(), None if b is None else b64.abs())
    assert ((out.double() - (want.relu() if relu else want)).abs() <= bound).all()
    torch.library.opcheck(torch.ops.tore_kernels.few_rows_linear.default, (x, packed, b, relu),
                          test_utils=("test_schema", "test_faketensor"))


@needs_few_rows
@pytest.mark.parametrize("clone", backend.ISA_CLONES)
def test_few_rows_linear_every_isa_clone(clone):
    """Its tiles are compiled for the baseline ISA, AVX2 (6 rows x 16 columns) and AVX-512 (14 rows x 32 columns),
    the widest that the CPU and ATEN_CPU_CAPABILITY allow running: the value tests rerun under each clone."""
    run_under_clone(clone, __file__, "test_few_rows_linear_against_float64",
                    expect_passed=len(FEW_ROWS_CASES["m"]) * len(FEW_ROWS_CASES["kn"]) * 2)


@needs_few_rows
def test_few_rows_linear_empty_products():
    packed = lin.pack_few_rows_weight(torch.randn(64, 0))
    b = torch.randn(64)
    assert torch.equal(torch.ops.tore_kernels.few_rows_linear(torch.randn(3, 0), packed, b, False), b.expand(3, 64))
    assert torch.ops.tore_kernels.few_rows_linear(torch.randn(0, 8), lin.pack_few_rows_weight(torch.randn(64, 8)),
                                                  None, True).shape == (0, 64)


@needs_few_rows
@pytest.mark.parametrize("change, match", [
    (lambda x, p, b: (x[None], p, b), r"x must be a 2-D float32 \[M, K\] tensor, got 3-D"),
    (lambda x, p, b: (x.double(), p, b), r"x must be a 2-D float32 \[M, K\] tensor, got 2-D Double"),
    (lambda x, p, b: (x[:, :-1], p, b), r"packed must be a contiguous float32 \[N / 32, K = 63, 32\]"),
    (lambda x, p, b: (x, p.reshape(8, 64, 16), b), r"packed must be a contiguous float32 \[N / 32, K = 64, 32\]"),
    (lambda x, p, b: (x, p.transpose(0, 1).contiguous().transpose(0, 1), b), "packed must be a contiguous"),
    (lambda x, p, b: (x, p.double(), b), "packed must be a contiguous float32"),
    (lambda x, p, b: (x, p, b[:-1]), r"bias must be a contiguous float32 \[N = 128\] tensor"),
    (lambda x, p, b: (x, p, b.double()), r"bias must be a contiguous float32 \[N = 128\] tensor"),
])
def test_few_rows_linear_rejects_bad_arguments(change, match):
    """Named errors, never a read out of bounds: the op is reachable as torch.ops.tore_kernels.few_rows_linear."""
    x, w, b = _few_rows_args(14, 64, 128, True)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.tore_kernels.few_rows_linear(*change(x, lin.pack_few_rows_weight(w), b), False)


@pytest.mark.parametrize("isa,m,n,few", [
    ("avx512", 1, 512, False), ("avx512", 2, 2048, True), ("avx512", 40, 512, True), ("avx512", 41, 128, False),
    ("avx512", 14, 100, False), ("avx2", 40, 512, True), ("avx2", 41, 512, False), ("baseline", 2, 128, False),
    (None, 2, 128, False)])
def test_few_rows_rule_per_clone(isa, m, n, few, monkeypatch):
    # measured (FEW_ROWS): 2-40 rows with AVX-512 and with AVX2, of any weight; never on the baseline clone or
    # without the extension; whole 32-column panels
    monkeypatch.setattr(lin.backend, "cpu_isa", lambda: isa)
    monkeypatch.setattr(lin, "HAS_FEW_ROWS", True)
    assert lin._few_rows(m, n) == few


@needs_few_rows
@pytest.mark.parametrize("rows", [None, (64, 128)])
def test_linear_runs_few_rows_where_it_applies(rows, monkeypatch):
    monkeypatch.setattr(lin, "FEW_ROWS", {backend.cpu_isa(): 16})  # this CPU's clone, whichever it is
    g = torch.Generator().manual_seed(11)
    w, b = torch.nn.Parameter(torch.randn(192, 64, generator=g)), torch.nn.Parameter(torch.randn(192, generator=g))
    x = torch.randn(3, 5, 64, generator=g).transpose(0, 1)  # 15 rows, 3-D and not contiguous
    lo, hi = rows or (0, 192)
    with torch.no_grad():
        got = lin.linear(x, w, b, rows=rows, relu=True)
    taken = [k for k in lin._DERIVED.copy() if k[0] == id(w) and k[1] == f"few_rows:{lo}:{hi}"]
    assert taken, "few_rows_linear not taken"
    torch.testing.assert_close(got, F.linear(x, w[lo:hi], b[lo:hi]).relu(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert lin._path(torch.randn(17, 64), w, b, hi - lo) != "few_rows"  # beyond FEW_ROWS: the packed GEMMs

