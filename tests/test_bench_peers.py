"""The peers benchmark's own logic (no timing): a missing runtime is skipped with its reason, outputs that disagree
fail their row, the exported part stops at the coarse vertices and the batched upsampling completes it."""
import copy
import importlib.util

import pytest
import torch
from torch import nn

from tore_benchmarks import bench_peers
from tore_benchmarks.harness import Skipped
from tore_reference import released


def test_missing_runtime_is_skipped_with_its_reason(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("onnxruntime", "openvino", "torchvision") else real(name, *a))
    x = torch.zeros(1, 3)
    for runtime, name in ((bench_peers._onnxruntime, "onnxruntime"), (bench_peers._openvino, "openvino")):
        variant = bench_peers._exported_variant(runtime, "net.onnx", lambda *o: list(o), x)
        assert isinstance(variant, Skipped) and variant.reason.startswith(f"{name} not installed")
    assert bench_peers._resnet50().startswith("torchvision not installed")
    broken = bench_peers._exported_variant(lambda path, threads: 1 / 0, "net.onnx", None, x)
    assert isinstance(broken, Skipped) and "ZeroDivisionError" in broken.reason


def test_outputs_that_disagree_fail_their_row():
    ref = {"a": torch.ones(2, 3), "b": torch.full((4,), 2.0)}
    fn, note = bench_peers._checked(lambda: {"a": torch.ones(2, 3), "b": torch.full((4,), 2.0 + 1e-6)}, ref)
    assert callable(fn) and note.startswith("err ")
    bad, _ = bench_peers._checked(lambda: [torch.ones(2, 3), torch.full((4,), 2.1)], ref)
    with pytest.raises(AssertionError, match="outputs differ from eager"):
        bad()
    assert bench_peers._error([torch.ones(2)], ref) == float("inf")  # a different structure
    # a looser bound (the bf16 rows: twice autocast's own difference) passes 0.05 of the range, a tighter one fails
    loose, note = bench_peers._checked(lambda: [torch.ones(2, 3), torch.full((4,), 2.1)], ref, tolerance=0.1)
    assert torch.equal(loose()[1], torch.full((4,), 2.1)) and note == "err 5.0e-02"
    tight, _ = bench_peers._checked(lambda: [torch.ones(2, 3), torch.full((4,), 2.1)], ref, tolerance=0.01)
    with pytest.raises(AssertionError, match=r"> 0.01\)"):
        tight()


def test_exported_part_plus_batched_upsampling_gives_the_network_outputs():
    torch.manual_seed(0)
    model = released.build_tore_fastmetro(tiny=True, backbone=nn.Identity()).eval()
    x = torch.randn(2, 64, 7, 7)
    name, _, keep, full, _ = next(bench_peers._networks(quick=True))
    coarse = bench_peers._ToCoarse(released.build_tore_fastmetro(tiny=True, backbone=nn.Identity()), keep)
    coarse.load_state_dict({f"model.{k}": v for k, v in model.state_dict().items()})
    with torch.no_grad():
        ref, part = model(x), coarse.eval()(x)
    assert len(part) == 4 and part[2].shape == (2, 431, 3)  # cam, joints, coarse vertices, heatmap
    assert bench_peers._error(full(*part), ref) < 1e-5


def test_a_variant_that_raises_fails_its_row_and_tensors_compare_whole():
    def broken():
        raise RuntimeError("no kernel")
    fn, note = bench_peers._checked(broken, [torch.ones(3)])
    with pytest.raises(RuntimeError, match="no kernel"):
        fn()
    assert note == "" and bench_peers._error(torch.ones(2, 3), [torch.ones(2, 3)]) == 0.0


def test_compiled_variant_is_timed_on_its_graph_or_fails_its_row(monkeypatch):
    """``patch(compile=True)``'s row: its first call captures; a signature that stays eager fails the row (its
    eager forward is not what the row names), else the replayed graph's outputs are checked."""
    from tore_kernels.patch import capture, patch

    torch.manual_seed(0)
    model = released.build_tore_fastmetro(tiny=True, backbone=nn.Identity()).eval()
    x = torch.randn(2, 64, 7, 7)
    with torch.no_grad():
        ref = model(x)
    monkeypatch.setattr(capture, "_compile", lambda graph, inputs: graph)  # the FX graph itself: no inductor
    fn, note = bench_peers._captured(patch(copy.deepcopy(model), compile=True), x, ref)
    assert note.startswith("err ") and bench_peers._error(fn(), ref) < 1e-5

    def broken(graph, inputs):
        raise RuntimeError("no C++ compiler")
    monkeypatch.setattr(capture, "_compile", broken)
    fn, _ = bench_peers._captured(patch(copy.deepcopy(model), compile=True), x, ref)
    with pytest.raises(AssertionError, match="runs eagerly.*no C\\+\\+ compiler"):
        fn()
