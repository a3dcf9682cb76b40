"""What users pick instead on CPU, side by side with ``patch``, in one process: ``tore-kernels bench peers``.

For each network (the released structures of ``tore_reference.released``: TORE-FastMETRO-L ITP 0.8 + GTR and
FastMETRO-L behind an identity backbone over
``[B, 2048, 7, 7]`` features, and TORE-FastMETRO-L on a torchvision ResNet-50 with random weights, images
in) the variants are: the eager network, ``torch.compile`` of it (default options), ONNX Runtime and OpenVINO
running an export of it (``torch.onnx.export`` of the unpatched network, fp32: OpenVINO's inference precision is
set to f32, else it picks bf16 on CPUs with AMX), ``tore_kernels.patch`` and ``patch(model, compile=True)`` (its graph
captured in the warm-up, then replayed). The exported networks stop at the
coarse vertices and get the same batched sparse upsampling (``tore_kernels.nn.MeshSampler``) afterwards, which
favours them. Every variant's outputs are checked against the eager ones (a variant that disagrees fails its row);
a peer that is not installed or cannot run here is skipped with its reason. Runtimes use torch's thread count and
do not spin between calls, so that alternating the variants measures each alone.
"""
from __future__ import annotations

import copy
import importlib.util
import os
import tempfile
import warnings

import torch
from torch import nn

from tore_kernels.backend import bf16_native
from tore_kernels.nn.mesh import MeshSampler
from tore_kernels.patch import patch
from tore_kernels.patch.capture import disagreement
from tore_reference import released
from tore_benchmarks.harness import Case, Skipped, entry

REPS = 7  # medians of 7 alternated repetitions: a batch-32 network call takes seconds
BATCH1_REPS = 21  # at batch 1 a repetition takes tenths of a second: more of them, for a steadier median
COMPILED = "patched compile=True"
# agreement with eager: max |difference| / max |eager output|, over all outputs (fp32 reassociation and the
# folded BatchNorm move results by ~1e-6 of their range; 1e-3 flags a wrong graph, not rounding)
TOLERANCE = 1e-3


class _ToCoarse(nn.Module):
    """The network up to its coarse vertices (what is exported): its mesh sampler replaced by one that returns its
    input, and only the outputs in ``keep`` returned (as a tuple)."""

    class _Identity:
        def upsample(self, x, n1=1, n2=0):
            return x

    def __init__(self, model, keep):
        super().__init__()
        self.model, self.keep = model, keep
        model.mesh_sampler = self._Identity()

    def forward(self, x):
        out = self.model(x)
        return tuple(out[k] for k in self.keep)


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return list(out.values()) if isinstance(out, dict) else list(out)


def _networks(quick):
    """(name, eager network, exported outputs, upsampling of the exported outputs, input shape): the released
    structures (``tore_reference.released``), images or features in."""
    sampler = MeshSampler(released.mesh_topology("smpl"))

    def tore_full(cam, joints, coarse, heatmap):
        mid = sampler.upsample(coarse, n1=2, n2=1)
        return [cam, joints, coarse, mid, sampler.upsample(mid, n1=1, n2=0), heatmap]

    def fastmetro_full(cam, joints, coarse, mid):
        return [cam, joints, coarse, mid, sampler.upsample(mid, n1=1, n2=0)]

    tore_keep = (0, 1, 2, 5)
    fastmetro_keep = ("pred_cam", "pred_3d_joints", "pred_3d_vertices_coarse", "pred_3d_vertices_intermediate")
    torch.manual_seed(0)
    features = (2048, 7, 7)
    yield ("TORE-FastMETRO-L ITP+GTR", released.build_tore_fastmetro(backbone=nn.Identity()).eval(), tore_keep,
           tore_full, features)
    if not quick:
        yield ("FastMETRO-L", released.build_fastmetro(backbone=nn.Identity()).eval(), fastmetro_keep,
               fastmetro_full, features)
    backbone = _resnet50()
    name = "TORE-FastMETRO-L ITP+GTR on ResNet-50"
    if isinstance(backbone, str):
        yield name, backbone, None, None, None
    else:
        yield name, released.build_tore_fastmetro(backbone=backbone).eval(), tore_keep, tore_full, (3, 224, 224)


def _resnet50():
    """The release's backbone: torchvision's ResNet-50 without avgpool and fc (random weights, BatchNorm statistics
    from a few random images so that folding them is not the identity); or why it cannot be built."""
    if importlib.util.find_spec("torchvision") is None:
        return "torchvision not installed (pip install 'tore-kernels[bench]')"
    torch.manual_seed(0)
    backbone = released.resnet50_backbone()
    for m in backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the calibration batch
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    with torch.no_grad():
        backbone.train()(torch.randn(4, 3, 224, 224))
    return backbone.eval()


def _onnx_file(model, keep, x, folder):
    """Export the unpatched network up to its coarse vertices; the path of the .onnx file."""
    exported = copy.deepcopy(model)
    path = os.path.join(folder, f"net-b{x.shape[0]}.onnx")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(_ToCoarse(exported, keep).eval(), (x,), path, input_names=["x"], dynamo=False,
                          opset_version=17)
    return path


def _onnxruntime(path, threads):
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime not installed (pip install 'tore-kernels[bench]')"
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x})


def _openvino(path, threads):
    if importlib.util.find_spec("openvino") is None:
        return "openvino not installed (pip install 'tore-kernels[bench]')"
    import openvino as ov

    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                                     "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()

    def run(x):
        request.infer({0: x})
        return [request.get_output_tensor(i).data for i in range(len(compiled.outputs))]
    return run


def _exported_variant(runtime, path, full, x):
    """A variant running ``runtime``'s session on ``x`` and the batched upsampling after it (or Skipped)."""
    try:
        session = runtime(path, torch.get_num_threads())
    except Exception as exc:  # a runtime that cannot load the export is skipped with the reason
        return Skipped(f"{type(exc).__name__}: {exc}"[:200])
    if isinstance(session, str):
        return Skipped(session)
    array = x.numpy()
    return lambda: full(*(torch.from_numpy(o) for o in session(array)))


def _error(out, ref) -> float:
    """max |out - ref| / max |ref| over all outputs (inf for a different structure)."""
    out, ref = _flat(out), _flat(ref)
    if len(out) != len(ref) or any(o.shape != r.shape for o, r in zip(out, ref)):
        return float("inf")
    return disagreement(out, ref)


def _checked(fn, ref, tolerance=TOLERANCE):
    """``fn`` if its outputs agree with ``ref`` within ``tolerance`` of their range (and the note saying how
    closely), else a variant that fails."""
    with torch.no_grad():
        try:
            err = _error(fn(), ref)
        except Exception:  # a variant that cannot run fails its row (timing it reports the error)
            return fn, ""
    if not err <= tolerance:
        def disagrees():
            raise AssertionError(f"outputs differ from eager by {err:.3g} of their range (> {tolerance:.3g})")
        return disagrees, ""
    return fn, f"err {err:.1e}"


def _captured(model, x, ref):
    """``patch(model, compile=True)``'s variant, checked against ``ref`` on its replayed graph: the first call
    captures (its warning, where that signature stays eager, fails the row instead of timing the eager forward)."""
    call = _no_grad(model, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    refused = [str(w.message) for w in caught if "compile=True" in str(w.message)]
    if refused:
        def eager():
            raise AssertionError(refused[0][:300])
        return eager, ""
    return _checked(call, ref)


def _no_grad(model, x, autocast_bf16=False):
    def call():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
            return model(x)
    return call


@entry("peers")
def peers(device, quick):
    if device.type != "cpu":
        return  # the peers compared here are CPU runtimes
    with tempfile.TemporaryDirectory(prefix="tore-peers-") as folder:
        for name, model, keep, full, shape in _networks(quick):
            if isinstance(model, str):
                yield Case("peers", {"model": name}, {"eager": lambda: None, "patched": Skipped(model)})
                continue
            compiled = None if quick else torch.compile(copy.deepcopy(model))
            patched = patch(copy.deepcopy(model))  # the backbone too (patch(model, backbone=False) opts out)
            captured = None if quick else patch(copy.deepcopy(model), compile=True)
            for batch in ((1,) if quick else (1, 32)):
                x = torch.randn(batch, *shape)
                with torch.no_grad():
                    ref = model(x)
                try:
                    path, export_error = _onnx_file(model, keep, x, folder), ""
                except Exception as exc:
                    path, export_error = None, f"export failed: {type(exc).__name__}: {exc}"[:200]
                variants, notes = {"eager": _no_grad(model, x)}, {}
                if compiled is None:
                    variants["torch.compile"] = Skipped("not in --quick (compiling takes minutes)")
                else:
                    variants["torch.compile"], notes["torch.compile"] = _checked(_no_grad(compiled, x), ref)
                for runtime_name, runtime in (("onnxruntime", _onnxruntime), ("openvino", _openvino)):
                    variant = Skipped(export_error) if path is None else _exported_variant(runtime, path, full, x)
                    if not isinstance(variant, Skipped):
                        variant, notes[runtime_name] = _checked(variant, ref)
                    variants[runtime_name] = variant
                variants["patched"], notes["patched"] = _checked(_no_grad(patched, x), ref)
                if captured is None:
                    variants[COMPILED] = Skipped("not in --quick (capturing compiles for tens of seconds)")
                else:
                    variants[COMPILED], notes[COMPILED] = _captured(captured, x, ref)
                yield Case("peers", {"model": name, "batch": batch}, variants, reps=BATCH1_REPS if batch == 1 else REPS,
                           notes=notes)


@entry("backbone")
def backbone(device, quick):
    """torchvision's ResNet-50 trunk alone (the release's backbone): eager, eager on channels_last tensors,
    ``torch.jit.freeze`` of that (TorchScript's conv + BatchNorm folding), and ``patch``'s backbone forwards; where
    the CPU computes bf16 natively also eager and patched under bf16 autocast (what ``patch(dtype=torch.bfloat16)``
    runs the backbone in), the patched one checked to be as close to fp32 eager as autocast's own forward."""
    trunk = _resnet50()
    if isinstance(trunk, str) or device.type != "cpu":
        reason = trunk if isinstance(trunk, str) else "CPU only"
        yield Case("backbone", {"model": "ResNet-50"}, {"eager": lambda: None, "patched": Skipped(reason)})
        return
    from tore_kernels import backend
    from tore_kernels.patch import _patched_class
    from tore_kernels.patch.backbone import backbone_forwards

    backend.tune_malloc()  # as patch(model) does: every variant then reuses freed memory instead of faulting it in

    channels_last = copy.deepcopy(trunk).to(memory_format=torch.channels_last)
    frozen = torch.jit.freeze(torch.jit.script(copy.deepcopy(channels_last)))
    patched = copy.deepcopy(trunk)
    for module, forward in backbone_forwards(patched):  # what patch(model) applies to model.backbone
        module.__class__ = _patched_class(type(module), forward)
    for batch in ((1,) if quick else (1, 32)):
        x = torch.randn(batch, 3, 224, 224)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            ref = trunk(x)
        variants, notes = {"eager": _no_grad(trunk, x)}, {}
        for name, fn in (("channels_last", _no_grad(channels_last, x_cl)), ("jit.freeze", _no_grad(frozen, x_cl)),
                         ("patched", _no_grad(patched, x))):
            variants[name], notes[name] = _checked(fn, [ref])
        if bf16_native():
            variants["eager bf16"] = _no_grad(trunk, x, autocast_bf16=True)
            autocast_err = _error(variants["eager bf16"](), [ref])
            notes["eager bf16"] = f"err {autocast_err:.1e}"
            # bf16 rounding of the folded weights: a difference of the order of autocast's own
            variants["patched bf16"], notes["patched bf16"] = _checked(_no_grad(patched, x, autocast_bf16=True),
                                                                       [ref], 2 * autocast_err)
        yield Case("backbone", {"model": "ResNet-50", "batch": batch}, variants, reps=REPS, notes=notes)
