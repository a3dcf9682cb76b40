"""ops.conv.conv2d (oneDNN on weights reordered once per input shape, for small fp32 inputs in inference) against
float64 F.conv2d; when it takes that path and when F.conv2d; its cache following the parameters; patch's Conv2d
forward."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tore_kernels.ops import conv as conv_ops
from tore_kernels.ops.linear import _DERIVED

onednn = pytest.mark.skipif(not conv_ops.HAS_ONEDNN_CONV, reason="torch without oneDNN's convolution ops")

# (x shape, weight shape, keyword arguments): 1x1 and 3x3 as the heads have them, strides, groups, dilation
CASES = [((1, 64, 7, 7), (32, 64, 1, 1), {}),
         ((2, 32, 7, 7), (16, 32, 3, 3), {"padding": 1}),
         ((1, 16, 9, 11), (8, 4, 3, 3), {"stride": 2, "padding": (1, 2), "groups": 4}),
         ((1, 8, 12, 12), (8, 8, 3, 3), {"dilation": 2, "padding": 2}),
         ((40, 16, 7, 7), (8, 16, 3, 3), {"padding": 1})]  # 1960 output positions: F.conv2d


def _packs(weight):
    """The shapes conv2d has reordered ``weight`` for."""
    return [set(hit[2]) for (i, tag), hit in _DERIVED.copy().items() if i == id(weight) and tag == "onednn-conv"]


def _assert_exact_within_fp32(y, x, w, b, kwargs):
    """``y`` is conv2d's float64 value within fp32 summation's bound (K = Cin/groups * kh * kw products and the bias
    per output)."""
    exact = F.conv2d(x.double(), w.double(), None if b is None else b.double(), **kwargs)
    k = w.shape[1] * w.shape[2] * w.shape[3] + 1
    mag = F.conv2d(x.double().abs(), w.double().abs(), None if b is None else b.double().abs(), **kwargs)
    assert y.shape == exact.shape and y.dtype == torch.float32
    assert ((y.double() - exact).abs() <= 2 * k * torch.finfo(torch.float32).eps * mag).all()


@onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_shape, w_shape, kwargs", CASES)
def test_matches_float64(x_shape, w_shape, kwargs, bias):
    torch.manual_seed(0)
    x, w = torch.randn(x_shape), torch.randn(w_shape)
    b = torch.randn(w_shape[0]) if bias else None
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        with torch.no_grad():
            y = conv_ops.conv2d(inp, w, b, **kwargs)
        _assert_exact_within_fp32(y, x, w, b, kwargs)
        assert y.is_contiguous() == inp.is_contiguous()  # the input's layout, as F.conv2d
    positions = y.shape[0] * y.shape[2] * y.shape[3]
    assert _packs(w) == ([{x.shape}] if positions <= conv_ops.PACKED_CONV_POSITIONS else [])


@onednn
def test_reordered_once_per_shape_up_to_a_limit_and_refreshed_with_the_weight():
    torch.manual_seed(0)
    w, b = torch.randn(8, 16, 3, 3), torch.randn(8)
    shapes = [(1, 16, s, s) for s in range(5, 5 + conv_ops.MAX_PACKED_SHAPES + 2)]
    with torch.no_grad():
        for shape in shapes + [shapes[0]]:
            x = torch.randn(shape)
            _assert_exact_within_fp32(conv_ops.conv2d(x, w, b, padding=1), x, w, b, {"padding": 1})
        assert _packs(w) == [set(torch.Size(s) for s in shapes[:conv_ops.MAX_PACKED_SHAPES])]
        w.mul_(-2)  # an in-place update: a new version, reordered again
        _assert_exact_within_fp32(conv_ops.conv2d(x, w, b, padding=1), x, w, b, {"padding": 1})
        assert _packs(w) == [{x.shape}]


@onednn
def test_runs_f_conv2d_where_the_reordered_path_does_not_apply():
    torch.manual_seed(0)
    w = torch.randn(4, 8, 3, 3, requires_grad=True)
    x = torch.randn(1, 8, 7, 7)
    (grad,) = torch.autograd.grad(conv_ops.conv2d(x, w, padding=1).sum(), w)  # autograd: F.conv2d's
    torch.testing.assert_close(grad, torch.autograd.grad(F.conv2d(x, w, padding=1).sum(), w)[0])
    with torch.no_grad():
        for args, kwargs in [((x.double(), w.double()), {"padding": 1}),  # float64
                             ((x, w), {"padding": "same"}),  # a string padding
                             ((torch.randn(0, 8, 7, 7), w), {"padding": 1})]:  # an empty batch
            torch.testing.assert_close(conv_ops.conv2d(*args, **kwargs), F.conv2d(*args, **kwargs))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides the dtype: F.conv2d's
            assert conv_ops.conv2d(x, w, padding=1).dtype == F.conv2d(x, w, padding=1).dtype
    assert _packs(w) == []
    with torch.no_grad(), pytest.raises(RuntimeError):  # F.conv2d's own error for mismatched channels
        conv_ops.conv2d(torch.randn(1, 5, 7, 7), w.detach())


@onednn
def test_patch_runs_the_heads_conv_on_it():
    from test_zoo import assert_all_close, build, run
    from tore_kernels.patch import patch, patch_report
    from tore_reference import released

    model = build("fastmetro_body", "cpu")
    images = released.example_images(1, tiny=True)
    with torch.no_grad():
        ref = run(model, images)
        fast = patch(model)
        out = run(fast, images)
    assert type(fast.conv_1x1).__bases__ == (nn.Conv2d,)
    assert _packs(fast.conv_1x1.weight)  # the small conv_1x1 took the reordered weight
    assert any(path == "Conv2d modules" for path, _, _ in patch_report(fast).swapped)
    assert_all_close(out, ref)
