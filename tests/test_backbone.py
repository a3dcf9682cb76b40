"""The backbone's eval-mode forwards (conv + BatchNorm folded, oneDNN convs with ReLU / residual fused,
channels_last inside) against the module's own forward in float64; fallbacks; state untouched; caches refreshed."""
import copy
import pickle

import pytest
import torch
from torch import nn

from tore_kernels.patch.backbone import _sequential_top_forward, backbone_forwards
from tore_kernels.backend import bf16_native
from tore_kernels.ops.conv import MAX_PACKED_SHAPES
from tore_kernels.patch import _patched_class, backbone


# structure-faithful rewrites of torchvision's ResNet pieces (same attribute names and forwards)
class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class BasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        down = lambda cin, cout, s: nn.Sequential(nn.Conv2d(cin, cout, 1, stride=s, bias=False), nn.BatchNorm2d(cout))
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2, down(16, 32, 2)))
        self.layer3 = nn.Sequential(Bottleneck(32, 8, 2, down(32, 32, 2)), Bottleneck(32, 8))
        self.layer4 = nn.Sequential(Bottleneck(32, 16, 1, down(32, 64, 1)))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _randomise_batchnorm(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model


def _apply(model):
    plan = backbone_forwards(model)
    for module, forward in plan:
        module.__class__ = _patched_class(type(module), forward)
    return plan


def _models():
    torch.manual_seed(0)
    resnet = _randomise_batchnorm(ResNet()).eval()
    trunk = nn.Sequential(*list(copy.deepcopy(resnet).children())[:-2]).eval()  # FastMETRO's backbone
    return {"resnet": resnet, "sequential trunk": trunk}


def _errors(model, x):
    """max |fp32 - float64| of the module's own forward and of the patched one, and the output scale."""
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        exact = ref(x.double())
        eager = model(x)
        patched = copy.deepcopy(model)
        plan = _apply(patched)
        fast = patched(x)
    scale = float(exact.abs().max())
    return float((eager.double() - exact).abs().max()), float((fast.double() - exact).abs().max()), scale, plan, fast


@pytest.mark.parametrize("name", ["resnet", "sequential trunk"])
@pytest.mark.parametrize("batch", [1, 3])
def test_matches_float64_within_fp32_rounding(name, batch):
    model = _models()[name]
    x = torch.randn(batch, 3, 64, 48)
    eager_err, fast_err, scale, plan, fast = _errors(model, x)
    assert len(plan) == 14  # the top level, 6 blocks, 3 downsample Sequentials, 4 Sequentials of blocks
    # folding reassociates the BatchNorm: the error is of the eager fp32 forward's order, both far below 1e-5
    eps = torch.finfo(torch.float32).eps
    assert fast_err <= max(4 * eager_err, 64 * eps * scale), (fast_err, eager_err, scale)
    assert fast.is_contiguous()  # a contiguous input gives a contiguous output, as the module's own forward


def test_blocks_alone_and_channels_last_input():
    model = _models()["resnet"]
    block = model.layer3[0]
    x = torch.randn(2, 32, 12, 10)
    with torch.no_grad():
        ref = copy.deepcopy(block).double()(x.double())
        patched = copy.deepcopy(block)
        assert [f.__name__ for _, f in _apply(patched)] == ["_bottleneck_forward", "_sequential_forward"]
        y = patched(x)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        y_cl = patched(x_cl)
    assert torch.allclose(y.double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(y_cl, y, atol=1e-6, rtol=1e-6)
    top = copy.deepcopy(model)
    _apply(top)
    with torch.no_grad():
        out = top(torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    assert out.shape == (1, 10)


def test_identity_shortcut_leaves_the_input_alone():
    block = _randomise_batchnorm(BasicBlock(8, 8)).eval()
    _apply(block)
    x = torch.randn(2, 8, 9, 9)
    before = x.clone()
    with torch.no_grad():
        block(x)
    assert torch.equal(x, before)


def test_blocks_sum_into_inputs_only_their_loop_holds(monkeypatch):
    # a Sequential of blocks lets each block after the first (and one with a folded downsample) accumulate its
    # residual sum into its input; the caller's tensor, and any tensor a hook could see, stay as they were
    layer = _randomise_batchnorm(nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8),
                                               Bottleneck(8, 2, 1, nn.Sequential(nn.Conv2d(8, 8, 1, bias=False),
                                                                                 nn.BatchNorm2d(8))))).eval()
    ref = copy.deepcopy(layer).double()
    assert [f.__name__ for _, f in _apply(nn.Sequential(layer))][:2] == ["_sequential_top_forward", "_blocks_forward"]
    flags, real = [], backbone._conv_bn

    def spy(conv, bn, x, relu=False, residual=None, into_residual=False):
        if residual is not None:
            flags.append(into_residual)
        return real(conv, bn, x, relu, residual, into_residual)
    monkeypatch.setattr(backbone, "_conv_bn", spy)
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    before = x.clone()
    with torch.no_grad():
        exact = ref(x.double())
        y = layer(x)
        assert flags == [False, True, True] and torch.equal(x, before)
        torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-5)
        seen = []
        layer[1].register_forward_pre_hook(lambda mod, args: seen.append((args[0], args[0].clone())))
        flags.clear()
        torch.testing.assert_close(layer(x), y, rtol=0, atol=0)
    assert flags == [False, False, True]  # called one by one: the hooked block's input is left alone
    assert torch.equal(seen[0][0], seen[0][1])


def test_state_dict_and_parameters_unchanged():
    model = _models()["resnet"]
    params = [id(p) for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _apply(model)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert [id(p) for p in model.parameters()] == params
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())


def test_training_and_grad_run_the_modules_own_forward():
    model = _models()["resnet"]
    patched = copy.deepcopy(model)
    _apply(patched)
    x = torch.randn(2, 3, 32, 32)
    # eval with autograd: the module's own forward, bit for bit, and gradients reach the parameters
    y, y_ref = patched(x), model(x)
    assert torch.equal(y, y_ref)
    y.sum().backward()
    assert patched.conv1.weight.grad is not None and patched.layer3[0].bn2.weight.grad is not None
    # training mode: batch statistics, running statistics updated as by the module itself
    model.train(), patched.train()
    with torch.no_grad():
        assert torch.equal(patched(x), model(x))
    assert torch.equal(patched.layer1[0].bn1.running_mean, model.layer1[0].bn1.running_mean)


@pytest.mark.parametrize("name", ["resnet", "sequential trunk"])
def test_bf16_autocast_runs_folded_in_bf16_where_native(name, monkeypatch):
    if not bf16_native():
        pytest.skip("this CPU has no native bf16: oneDNN would emulate the bf16 convs (the fallback test covers it)")
    model = _models()[name]
    x = torch.randn(2, 3, 64, 48)
    patched = copy.deepcopy(model)
    _apply(patched)
    calls = []
    conv_bn = backbone._conv_bn
    monkeypatch.setattr(backbone, "_conv_bn", lambda *a, **k: calls.append(a[2].dtype) or conv_bn(*a, **k))
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eager, fast = model(x), patched(x)
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert len(calls) == convs and fast.dtype == eager.dtype == torch.bfloat16  # every conv + BatchNorm folded
    assert set(calls[1:]) == {torch.bfloat16}  # bf16 from the stem on: no fp32 round trips between the convs
    # bf16 rounding of the folded weights instead of autocast's per-conv casts: errors of the same order
    eager_err, fast_err = (float((y.double() - exact).abs().max()) for y in (eager, fast))
    assert fast_err <= 2 * eager_err, (fast_err, eager_err, float(exact.abs().max()))


def test_bf16_autocast_without_native_bf16_runs_the_modules_own_forward(monkeypatch):
    monkeypatch.setattr(backbone, "bf16_native", lambda: False)
    model = _models()["resnet"]
    patched = copy.deepcopy(model)
    _apply(patched)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(patched(x), model(x))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):  # fp16 autocast: never folded
        assert torch.equal(patched(x), model(x))


def _in_place_updates(m, x):
    m[4][0].bn1.running_var.mul_(3.0)  # in place: a new version of the buffer
    m[4][0].conv2.weight.mul_(-0.5)
    m[1].bias.add_(0.25)


def _training_mode_forward(m, x):
    # moves the BatchNorm statistics in place without bumping their version counters (num_batches_tracked's it
    # does): keyed on the statistics alone, the next eval forward used the first fold (0.37 off here)
    m.train()(x * 2 + 1)
    m.eval()


@pytest.mark.parametrize("update", [_in_place_updates, _training_mode_forward], ids=["in place", "training forward"])
def test_folded_weights_follow_parameter_and_statistics_updates(update):
    model = _models()["sequential trunk"]
    patched = copy.deepcopy(model)
    _apply(patched)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        patched(x)  # caches the folded weights
        for m in (model, patched):
            update(m, x)
        ref, fast = model(x), patched(x)
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)


def test_weights_reordered_per_input_shape_up_to_a_limit():
    # each conv's folded weight is reordered once per input shape (oneDNN's layout for it), for at most
    # MAX_PACKED_SHAPES shapes; further shapes run on the channels_last weight, with the same results
    block = _randomise_batchnorm(BasicBlock(8, 8)).eval()
    ref = copy.deepcopy(block)
    _apply(block)
    sizes = range(5, 5 + MAX_PACKED_SHAPES + 2)
    with torch.no_grad():
        for size in sizes:
            x = torch.randn(2, 8, size, size)
            torch.testing.assert_close(block(x), ref(x), rtol=1e-4, atol=1e-4)
    packs = backbone._folded(block.conv1, block.bn1)[2]
    assert sorted(s[-1] for s in packs) == list(sizes)[:MAX_PACKED_SHAPES]


def test_unrecognised_parts_keep_their_forward():
    class Bottleneck(nn.Module):  # the name, but no bn3: not the structure the fast forward assumes
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
            self.conv3, self.relu = nn.Conv2d(4, 4, 1), nn.ReLU()

        def forward(self, x):
            return self.conv3(self.bn2(self.conv2(self.bn1(self.conv1(x)))))

    assert backbone_forwards(Bottleneck()) == []
    assert backbone_forwards(nn.Linear(3, 3)) == []
    tracked = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU())
    assert backbone_forwards(tracked) == [(tracked, _sequential_top_forward)]  # the top level only
    with pytest.raises(TypeError, match="backbone must be an nn.Module"):
        backbone_forwards("resnet")


def test_patched_backbone_pickles_and_deepcopies():
    model = _models()["sequential trunk"]
    _apply(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
        for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert type(other[4][0]).forward is type(model[4][0]).forward
            assert torch.allclose(other(x), y, atol=1e-6, rtol=1e-6)


def test_torchvision_resnet50_trunk():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    resnet = _randomise_batchnorm(torchvision.models.resnet50(weights=None)).eval()
    trunk = nn.Sequential(*list(resnet.children())[:-2]).eval()
    eager_err, fast_err, scale, plan, fast = _errors(trunk, torch.randn(1, 3, 96, 96))
    assert sum(f.__name__ == "_bottleneck_forward" for _, f in plan) == 16
    eps = torch.finfo(torch.float32).eps
    assert fast_err <= max(4 * eager_err, 64 * eps * scale), (fast_err, eager_err, scale)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_patch_folds_every_batchnorm_of_the_released_networks_backbone(dtype):
    # patch gives the model's Conv2d modules a forward of their own (a per-instance subclass); the backbone still
    # folds them, the downsample Sequentials' included: no BatchNorm runs as a module in inference
    from tore_kernels.patch import patch
    from tore_kernels.patch.layers import released_class
    from tore_reference import released

    if dtype is torch.bfloat16 and not bf16_native():
        pytest.skip("no native bf16 on this CPU: patch(dtype=bf16) runs fp32, the fp32 case covers it")
    torch.manual_seed(0)
    backbone = _randomise_batchnorm(nn.Sequential(*list(ResNet().children())[:-2]))
    fast = patch(released.build_tore_fastmetro(tiny=True, backbone=backbone).eval(), dtype=dtype)
    assert any(released_class(m) is nn.Conv2d and type(m) is not nn.Conv2d for m in fast.backbone.modules())
    called = []
    for name, m in fast.backbone.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_pre_hook(lambda *_, name=name: called.append(name))
    with torch.no_grad():
        fast(torch.randn(1, 3, 224, 224))
    assert called == []


@pytest.mark.parametrize("trunk", ["small_backbone", "resnet trunk"])
def test_patch_reaches_the_released_networks_backbone(trunk):
    from tore_kernels.patch import patch, patch_report, unpatch
    from tore_reference import released

    torch.manual_seed(0)
    backbone = (released.small_backbone(64, stride=8) if trunk == "small_backbone"
                else nn.Sequential(*list(ResNet().children())[:-2]))
    model = released.nontrivial_norms(released.build_tore_fastmetro(tiny=True, backbone=backbone)).eval()
    images = released.example_images(2, tiny=True) if trunk == "small_backbone" else torch.randn(2, 3, 224, 224)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(images)
        fast = patch(copy.deepcopy(model))
        kept = patch(copy.deepcopy(model), backbone=False)
        out, out_kept = fast(images), kept(images)
    assert any(path == "backbone" for path, _, _ in patch_report(fast).swapped)
    assert type(fast.backbone).forward is _sequential_top_forward
    assert all(type(m).__module__ != "tore_kernels.patch.backbone" and "tore" not in type(m).forward.__module__
               for m in kept.backbone.modules())  # backbone=False: nothing under model.backbone is touched
    for o, o_kept, r in zip(out, out_kept, ref):
        scale = float(r.abs().max())
        assert torch.allclose(o, r, atol=1e-4 * scale, rtol=1e-4), float((o - r).abs().max()) / scale
        assert torch.allclose(o_kept, r, atol=1e-4 * scale, rtol=1e-4)
    assert all(torch.equal(fast.state_dict()[k], v) for k, v in state.items())
    unpatch(fast)
    assert type(fast.backbone) is nn.Sequential
