"""patch(model, compile=True): inference calls captured once per signature into one graph (make_fx), compiled by
inductor, replayed (tore_kernels.patch.capture).

The replayed graph is compared with the eager (unpatched) network on other inputs than the ones it was captured on,
captured where the batch's samples were identical (so a shortcut taken on the inputs' values would be wrong for the
replay). The keying (parameters, modes, hooks, shapes, structure) is tested with the graph run by the FX interpreter
instead of inductor (``capture._compile`` replaced: inductor takes ~20 s per graph on 2 cores), inductor itself on the
three TORE / FastMETRO structures."""
import copy
import pickle

import pytest
import torch
from torch import nn

from tore_kernels import backend
from tore_kernels.patch import capture, patch, patch_report, unpatch
from test_zoo import assert_all_close, build, images_on, run

CPU = torch.device("cpu")


def _same_samples(batch=2):
    """A batch of one image repeated: every value the network computes from it is the same in every sample."""
    return images_on(CPU, 1).expand(batch, -1, -1, -1).contiguous()


class _Calls:
    """Counts the eager (inner) forwards of ``model``'s captured forward; replays do not call it."""

    def __init__(self, model, monkeypatch):
        self.count = 0
        forward = type(model).forward
        inner = forward.inner

        def counted(*args, **kwargs):
            self.count += 1
            return inner(*args, **kwargs)
        monkeypatch.setattr(forward, "inner", counted)


def _graphs(model):
    state = capture._GRAPHS.get(model)
    return [] if state is None else list(state.graphs.values())


def _eager_and_compiled(name):
    """The eager network and a compile-patched copy of it."""
    eager = build(name, CPU)
    return eager, patch(copy.deepcopy(eager), compile=True)


@pytest.fixture
def interpreted(monkeypatch):
    """Captured graphs run by the FX interpreter (what make_fx traced), not compiled: the keying logic in seconds."""
    compiled = []

    def compile_(graph, inputs):
        compiled.append(graph)
        return graph
    monkeypatch.setattr(capture, "_compile", compile_)
    return compiled


@pytest.mark.parametrize("name", ["tore_fastmetro", "tore_fastmetro_gtr", "fastmetro_body"])
def test_compiled_graph_replays_eager_outputs_for_other_inputs(name, monkeypatch):
    eager, model = _eager_and_compiled(name)
    same, other = _same_samples(), images_on(CPU) * 0.7
    calls = _Calls(model, monkeypatch)
    with torch.no_grad():
        assert_all_close(run(model, same), run(eager, same))  # captures (the eager call, then the graph)
        assert calls.count == 2 and sum(map(callable, _graphs(model))) == 1
        assert_all_close(run(model, other), run(eager, other))
        assert_all_close(run(model, same), run(eager, same))
    assert calls.count == 2  # both replayed
    assert "compile=True" in str(patch_report(model))


def test_graph_follows_parameters_structure_modes_and_shapes(interpreted, monkeypatch):
    eager, model = _eager_and_compiled("tore_fastmetro")
    calls = _Calls(model, monkeypatch)
    images = images_on(CPU)

    def check(eager_calls, graphs=None):
        with torch.no_grad():
            assert_all_close(run(model, images), run(eager, images))
        assert calls.count == eager_calls
        if graphs is not None:
            assert len(interpreted) == graphs

    check(2, 1)  # captured: one eager call and the trace
    check(2, 1)  # replayed
    for m in (eager, model):  # an in-place change of a parameter
        with torch.no_grad():
            m.cam_predictor.bias.add_(0.5)
    check(4, 2)
    state = {k: v + 0.01 for k, v in eager.state_dict().items()}
    for m in (eager, model):
        m.load_state_dict(state)
    check(6, 3)
    torch.manual_seed(1)
    new = nn.Linear(eager.cam_predictor.in_features, 3).eval()  # a submodule replaced
    eager.cam_predictor, model.cam_predictor = new, copy.deepcopy(new)
    check(8, 4)
    buffers = capture.tensor_versions(model.buffers())
    for m in (model, eager):  # training mode: the eager forward (dropout 0.1: no comparison)
        m.train()
        with torch.no_grad():
            run(m, images)
        m.eval()
    assert calls.count == 9
    assert capture.tensor_versions(model.buffers()) != buffers  # the BatchNorm statistics moved: a new graph
    check(11, 5)
    check(11, 5)
    hook = model.transformer_2.register_forward_hook(lambda m, i, o: setattr(m, "_seen", True))
    check(12)  # hooked: eager, and the hook runs
    assert model.transformer_2.__dict__.pop("_seen")
    hook.remove()
    check(12)
    with torch.enable_grad():  # autograd: eager
        run(model, images)
    assert calls.count == 13
    monkeypatch.setattr(capture, "MAX_GRAPHS", 2)
    for batch in (1, 3):  # new signatures: captured, the least recently used graph dropped
        with torch.no_grad():
            assert_all_close(run(model, images_on(CPU, batch)), run(eager, images_on(CPU, batch)))
    assert sum(map(callable, _graphs(model))) == 2
    unpatch(model)
    assert _graphs(model) == []


def test_capture_that_fails_warns_runs_eagerly_and_is_not_retried(monkeypatch):
    eager, model = _eager_and_compiled("tore_fastmetro")
    tries = []

    def broken(graph, inputs):
        tries.append(graph)
        raise RuntimeError("no C++ compiler")
    monkeypatch.setattr(capture, "_compile", broken)
    images = images_on(CPU)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="compile=True.*runs eagerly.*no C\\+\\+ compiler"):
            assert_all_close(run(model, images), run(eager, images))
        assert_all_close(run(model, images), run(eager, images))
    assert len(tries) == 1


def test_graph_that_disagrees_with_eager_is_not_used(monkeypatch):
    model = patch(build("tore_fastmetro", CPU), compile=True)
    monkeypatch.setattr(capture, "_compile", lambda graph, inputs: lambda *x: [o * 1.01 for o in graph(*x)])
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="differ from the eager forward's by 0.01"):
        run(model, images_on(CPU))
    assert not any(map(callable, _graphs(model)))


def test_replay_runs_below_autograd_and_gives_ordinary_tensors(monkeypatch):
    """Graphs run (grad off: the check after capturing, then every replay) with the autograd dispatch keys excluded,
    so the custom ops' autograd kernels are skipped; the outputs are ordinary tensors (not inference tensors) that
    code with grad on can use afterwards."""
    below = []

    def compile_(graph, inputs):
        def replayed(*args):
            below.append(torch._C._dispatch_tls_is_dispatch_key_excluded(torch._C.DispatchKey.AutogradFunctionality))
            return graph(*args)
        return replayed
    monkeypatch.setattr(capture, "_compile", compile_)
    eager, model = _eager_and_compiled("tore_fastmetro")
    images = images_on(CPU)
    with torch.no_grad():
        run(model, images)  # captures: the eager call, then the graph's first (checked) call
        out = run(model, images)  # replays
        assert_all_close(out, run(eager, images))
    assert below == [True, True]
    assert not torch._C._dispatch_tls_is_dispatch_key_excluded(torch._C.DispatchKey.AutogradFunctionality)
    scale = torch.ones((), requires_grad=True)
    sum((o * scale).sum() for o in out).backward()
    assert not any(o.is_inference() or o.requires_grad for o in out)
    assert torch.isfinite(scale.grad)


def test_copies_of_a_compiled_model(interpreted):
    eager, model = _eager_and_compiled("fastmetro_body")
    images = images_on(CPU)
    with torch.no_grad():
        ref = run(eager, images)
        run(model, images)
        for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert patch_report(twin) is not None
            assert_all_close(run(twin, images), ref)
            assert sum(map(callable, _graphs(twin))) == 1  # a graph of its own (the copy's parameters)


def test_compile_argument():
    for name in ("metro", "tore_metro"):
        model = build(name, CPU)
        before = {n: type(m) for n, m in model.named_modules()}
        with pytest.raises(ValueError, match="compile=True captures the forward of models that take images only"):
            patch(model, compile=True)
        assert {n: type(m) for n, m in model.named_modules()} == before and patch_report(model) is None
    model = build("tore_fastmetro", CPU)
    with pytest.raises(TypeError, match="compile must be True or False"):
        patch(model, compile="yes")
    with pytest.raises(ValueError, match="compile=True runs fp32 graphs only"):
        patch(model, dtype=torch.bfloat16, compile=True)
    patch(model)
    with pytest.raises(ValueError, match="already patched with compile=False"):
        patch(model, compile=True)


def test_shortcut_checks_while_capturing():
    """A check on values computed from constants is taken (and fixed in the graph); one on values computed from
    the inputs says no; outside a capture every check is taken."""
    from torch.fx.experimental.proxy_tensor import make_fx

    weight = torch.ones(3)
    seen = []

    def forward(x):
        seen.append((capture.shortcut_applies(torch.equal, weight * 2, weight + 1),
                     capture.shortcut_applies(torch.equal, x * 2, x + 1)))
        return x + weight

    ones = torch.ones(3)
    assert capture.shortcut_applies(torch.equal, ones * 2, ones + 1)
    with backend.capture_tracing():
        make_fx(forward, pre_dispatch=True)(ones)
    assert not backend.capturing()
    assert seen == [(True, False)]


def test_threads_share_one_capture(interpreted):
    """Four threads calling a cold compile-patched model at once: one capture, every thread the eager outputs."""
    import threading

    eager, model = _eager_and_compiled("tore_fastmetro")
    images = images_on(CPU)
    with torch.no_grad():
        ref = run(eager, images)
    results, errors = [], []
    start = threading.Barrier(4)

    def call():
        try:
            start.wait()
            for _ in range(3):
                with torch.no_grad():
                    results.append(run(model, images))
        except Exception as exc:  # reported below
            errors.append(exc)
    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 12
    for got in results:
        assert_all_close(got, ref)
    assert len(interpreted) == 1
