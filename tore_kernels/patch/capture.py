"""``patch(model, compile=True)``: the patched inference forward captured once per call signature into one graph,
compiled by inductor (weights frozen in, C++ wrapper), and replayed.

At batch 1 a patched forward is about 600 small ops, and each pays Python, dispatch and the checks that pick its
path; the graph pays none of that: its pointwise ops and LayerNorms run fused in C++ loops, the GEMMs and our
kernels are called from C++, below autograd (the TORE-FastMETRO-L head at batch 1 on an AMD EPYC (Zen 4): 17.3
against 27.3 ms eager patched in the README's run of `tore-kernels bench peers`, 14.6 against 21.7 in an earlier one).
What the graph runs is what the patched forward ran: it is traced (``make_fx``) after one eager call has filled
every cache (packed weights, neighbour tables, blocks computed once), so the caches' contents are constants of the
graph. So the graph is keyed on everything they derive from, checked before each call: the inputs' shapes,
strides and dtypes, every parameter's and buffer's version and storage, the mesh sampler's matrices, grad,
inference and autocast mode, the thread count. A call that differs runs eagerly once and captures its own graph
(at most ``MAX_GRAPHS`` per model, the least recently used dropped); training, autograd, forward hooks,
non-CPU tensors and torch.compile run the eager patched forward.

The shortcuts the patched forwards take on tensor values (decoder queries that are the token embeddings, or the
same in every sample) ask :func:`shortcut_applies`: while capturing, a check on values computed from parameters and
buffers only is fixed into the graph, and one on values computed from the inputs says no (the general path, right
for every input). Any other decision on values makes ``make_fx`` raise: that signature then stays eager, with a
warning, as it does where inductor fails or where the compiled graph's first outputs disagree with the eager ones.
"""
from __future__ import annotations

import collections
import functools
import threading
import types
import warnings
import weakref

import torch
from torch.utils import _pytree as pytree

from .. import backend
from ..backend import capturing
from ..ops.linear import tensor_versions

MAX_GRAPHS = 4  # kept per model (one per batch shape, say), the least recently used dropped
MAX_TRIES = 16  # signatures a model may try to capture (a forward whose key never repeats must not compile forever)
# a captured graph is used only if its outputs agree with the eager forward's within this fraction of their range
# (fp32 reassociation in fused loops moves them by ~1e-6)
AGREEMENT = 1e-4

_LOCK = threading.Lock()  # the graph tables
_BUILDING = threading.Lock()  # one capture at a time (make_fx and inductor's configuration are process-wide)
_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> _Graphs


def _from_inputs(t: torch.Tensor) -> bool:
    """Whether the traced value ``t`` was computed from the captured forward's inputs (a graph placeholder)."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode, get_proxy_slot

    mode = get_proxy_mode()
    slot = None if mode is None else get_proxy_slot(t, mode.tracer, None)
    if slot is None:  # never touched by the trace: a constant
        return False
    seen, todo = set(), [slot.proxy.node]
    while todo:
        node = todo.pop()
        if node.op == "placeholder":
            return True
        for n in node.all_input_nodes:
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return False


def shortcut_applies(check, *tensors) -> bool:
    """``check(*tensors)``: whether a patched forward may take a shortcut that is right only for some values (the
    decoder queries are the token embeddings, the same in every sample, ...); False is right for every value. While
    a forward is captured, a check on tensors computed from parameters and buffers only is taken on the real
    values and fixed in the graph (which is keyed on them); on tensors computed from the inputs it is False: the
    graph takes the general path."""
    if not capturing():
        return check(*tensors)
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

    if any(isinstance(t, torch.Tensor) and _from_inputs(t) for t in tensors):
        return False
    with disable_proxy_modes_tracing():
        return bool(check(*tensors))


# Bumped whenever any module registers a parameter, buffer or submodule (assignments included): the flat lists a
# model's key is read from are rebuilt then.
_STRUCTURE = [0]


def _structure_changed(*_args):
    _STRUCTURE[0] += 1


@functools.lru_cache(maxsize=None)
def _watch_structure() -> None:
    from torch.nn.modules import module as _m

    for register in (_m.register_module_parameter_registration_hook, _m.register_module_buffer_registration_hook,
                     _m.register_module_module_registration_hook):
        register(_structure_changed)


class _Graphs:
    """A model's captured graphs (key -> callable, or the reason there is none) and the flat lists its key reads."""

    def __init__(self):
        self.graphs: collections.OrderedDict = collections.OrderedDict()
        self.tries = 0
        self.structure = None  # (generation, modules, tensors)

    def lists(self, model):
        if self.structure is None or self.structure[0] != _STRUCTURE[0]:
            self.structure = (_STRUCTURE[0], tuple(model.modules()), (*model.parameters(), *model.buffers()))
        return self.structure[1:]


def _hooked(modules) -> bool:
    """Forward hooks anywhere (a captured graph would skip them)."""
    from torch.nn.modules import module as _m

    return bool(_m._global_forward_hooks or _m._global_forward_pre_hooks) or any(
        m._forward_hooks or m._forward_pre_hooks for m in modules)


def _signature(x):
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.stride(), x.dtype, x.device, x.requires_grad)
    hash(x)  # other arguments are fixed in the graph: hashable values only
    return x


def _key(model, modules, tensors, leaves, spec):
    """What the captured graph of a call with arguments ``leaves`` (flattened by ``spec``) depends on, or None where
    the eager forward runs."""
    if torch.is_grad_enabled() or any(m.training for m in modules) or _hooked(modules):
        return None
    if not any(isinstance(x, torch.Tensor) for x in leaves) or any(
            isinstance(x, torch.Tensor) and x.device.type != "cpu" for x in leaves):
        return None
    try:
        inputs = tuple(_signature(x) for x in leaves)
    except TypeError:  # an unhashable argument
        return None
    sampler = getattr(model, "mesh_sampler", None)  # a plain object: its matrices are not buffers
    matrices = (*getattr(sampler, "_U", ()), *getattr(sampler, "_D", ()))
    modes = (torch.is_inference_mode_enabled(), torch.get_num_threads(), torch.is_autocast_enabled("cpu"),
             torch.get_autocast_dtype("cpu"), torch.backends.mkldnn.enabled, backend.forced_backend())
    return (str(spec), inputs, modes, tensor_versions(tensors), id(sampler),
            tuple((id(m), m._version) for m in matrices))


def disagreement(out, ref) -> float:
    """max |out - ref| / max |ref| over the outputs (sequences of tensors of the same shapes; also the peers
    benchmark's check)."""
    scale = max((float(r.abs().max()) for r in ref if r.numel()), default=0.0) or 1.0
    return max((float((o - r).abs().max()) / scale for o, r in zip(out, ref) if r.numel()), default=0.0)


def _compile(graph, inputs):
    """Inductor's compiled ``graph``: constants frozen in (its own prepacking and folding), a C++ wrapper around
    the kernels instead of Python."""
    from torch._inductor import config
    from torch._inductor.compile_fx import compile_fx

    with config.patch(freezing=True, cpp_wrapper=True):
        return compile_fx(graph, inputs)


def _run(compiled, tensors):
    """``compiled(*tensors)`` below autograd, for the check after capturing and for every replay. Graphs run only
    without grad (see _key), where an op's autograd kernel would only pass the call on: below it, the custom ops skip
    that round trip (through Python for the torch.library autograd ones; the TORE-FastMETRO-L head at batch 1 on an
    AMD EPYC (Zen 4): 1.02-1.04x, 1.07x capped at AVX2)."""
    with torch._C._AutoDispatchBelowAutograd():
        return compiled(*tensors)


def _capture(inner, model, args, kwargs):
    """(the eager outputs of this call, a function that replays them for calls of its signature compiled by
    inductor, or the reason there is none)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    eager = inner(model, *args, **kwargs)  # fills every cache the trace then reads as constants
    leaves, spec = pytree.tree_flatten((args, kwargs))
    where = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
    out_leaves, out_spec = pytree.tree_flatten(eager)
    if not all(isinstance(o, torch.Tensor) for o in out_leaves):
        return eager, "the forward returns values that are not tensors"

    def flat_forward(*tensors):
        full = list(leaves)
        for i, t in zip(where, tensors):
            full[i] = t
        a, k = pytree.tree_unflatten(full, spec)
        return tuple(pytree.tree_leaves(inner(model, *a, **k)))

    tensors = [leaves[i] for i in where]
    try:
        with backend.capture_tracing():
            graph = make_fx(flat_forward, pre_dispatch=True)(*tensors)
    except Exception as exc:  # a decision on the inputs' values, or an op make_fx cannot trace
        return eager, f"tracing failed: {type(exc).__name__}: {exc}"[:300]
    try:
        compiled = _compile(graph, tensors)
        out = _run(compiled, tensors)
    except Exception as exc:
        return eager, f"inductor failed: {type(exc).__name__}: {exc}"[:300]
    err = disagreement(out, out_leaves)
    if not err <= AGREEMENT:
        return eager, f"the compiled graph's outputs differ from the eager forward's by {err:.2g} of their range"

    def replay(flat):  # the call's arguments, flattened
        return pytree.tree_unflatten(list(_run(compiled, [flat[i] for i in where])), out_spec)
    return eager, replay


class CapturedForward:
    """A model forward (the patched class's ``forward``) that runs ``inner`` through graphs captured per call
    signature in inference, and ``inner`` itself elsewhere (see the module docstring)."""

    def __init__(self, inner):
        self.inner = inner
        functools.update_wrapper(self, inner)

    def __get__(self, obj, cls=None):
        return self if obj is None else types.MethodType(self, obj)

    def __reduce__(self):  # pickled by reference to ``inner``
        return captured, (self.inner,)

    def __call__(self, model, *args, **kwargs):
        if torch.compiler.is_compiling():
            return self.inner(model, *args, **kwargs)
        with _LOCK:
            state = _GRAPHS.get(model)
            if state is None:
                state = _GRAPHS[model] = _Graphs()
            leaves, spec = pytree.tree_flatten((args, kwargs))
            key = _key(model, *state.lists(model), leaves, spec)
            hit = None if key is None else state.graphs.get(key)
            if callable(hit):
                state.graphs.move_to_end(key)
        if callable(hit):
            return hit(leaves)
        if key is None or hit is not None or state.tries >= MAX_TRIES:  # eager here, or refused before
            return self.inner(model, *args, **kwargs)
        with _BUILDING:
            with _LOCK:
                hit = state.graphs.get(key)  # another thread may have captured it meanwhile
            if hit is not None:
                return hit(leaves) if callable(hit) else self.inner(model, *args, **kwargs)
            state.tries += 1
            eager, result = _capture(self.inner, model, args, kwargs)
            with _LOCK:
                state.graphs[key] = result
                kept = [k for k, g in state.graphs.items() if callable(g)]
                for k in kept[:-MAX_GRAPHS]:
                    del state.graphs[k]
        if not callable(result):
            warnings.warn(f"tore_kernels.patch(compile=True): a call of this signature runs eagerly ({result})",
                          RuntimeWarning, stacklevel=3)
        return eager


@functools.lru_cache(maxsize=None)
def captured(inner) -> CapturedForward:
    """The captured forward of ``inner`` (one object per function: the patched classes are cached per forward)."""
    _watch_structure()
    return CapturedForward(inner)


def forget(model) -> None:
    """Drop ``model``'s captured graphs (``unpatch``)."""
    with _LOCK:
        _GRAPHS.pop(model, None)
