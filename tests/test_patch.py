"""tore_kernels.patch / unpatch on models built with tore_reference in the released structures: TORE-FastMETRO
with ITP + GTR, with GTR only, the original FastMETRO ([J+V, J+V] mask) and TORE-METRO (NSR after a BERT encoder). Small sizes, the generated default
431-vertex body mesh, random weights with non-trivial LayerNorm affines."""
import copy
import importlib
import io
import os
import pickle
import platform
import subprocess
import sys

import pytest
import torch
from torch import nn

from tore_kernels import backend
from tore_kernels.nn.attention import AdjacencyMultiheadAttention
from tore_kernels.nn.mesh import MeshSampler
from tore_kernels.patch import PatchReport, patch, patch_report, unpatch
from tore_kernels.topology import default_body_mesh
from tore_reference import FastMETROHead, Mesh, ToreFastMETROHead, ToreMETROHead

linear_module = importlib.import_module("tore_kernels.ops.linear")
layers = importlib.import_module("tore_kernels.patch.layers")

# fp32: the patched model computes the same sums in other orders (SDPA / neighbour-list softmax instead of
# bmm + softmax, a precomposed upsampling chain, the fused ITP), through ~9 residual blocks of dot products of
# length <= 128: a few ulps of O(1) activations each, so ~1e-6 absolute on O(1) outputs; 2e-5 leaves margin
# without hiding a wrong mask or weight (those give O(0.1) errors).
TOL = dict(rtol=1e-4, atol=2e-5)
C_BACKBONE = 32
KINDS = {
    "tore_itp": (ToreFastMETROHead, dict(use_itp=True, model_dims=(64, 32, 32), feedforward_dims=(96, 64, 64))),
    "tore_gtr": (ToreFastMETROHead, dict(use_itp=False, model_dims=(64, 32, 32), feedforward_dims=(96, 64, 64))),
    "fastmetro": (FastMETROHead, dict(model_dims=(64, 32), feedforward_dims=(96, 64))),
    "tore_metro": (ToreMETROHead, dict(encoder_hidden=(64, 48), encoder_out=(48, 32), model_dim=32,
                                       feedforward_dim=64)),
}


@pytest.fixture(scope="module")
def topo():
    return default_body_mesh()


def build(kind, topo, dropout=0.1, seed=0):
    torch.manual_seed(seed)
    cls, kw = KINDS[kind]
    model = cls(topo.adjacency.to_dense(), Mesh(topo.upsampling, topo.downsampling), backbone_channels=C_BACKBONE,
                model_size="S", nhead=4, dropout=dropout, **kw)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    return model.eval()


def outputs(model, x):
    out = model(x)
    return tuple(out.values()) if isinstance(out, dict) else out


def assert_close_all(a, b, **tol):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert u.shape == v.shape, f"output {i}"
        torch.testing.assert_close(u, v, **tol, msg=lambda m: f"output {i}: {m}")


def attention_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}


@pytest.fixture
def features():
    torch.manual_seed(1)
    return torch.randn(2, C_BACKBONE, 7, 7)


@pytest.mark.parametrize("kind", list(KINDS))
def test_patch_matches_eager_and_unpatch_restores_exactly(kind, topo, features, monkeypatch):
    # these models are small: every linear of theirs would run F.linear; packing all of them checks the cache's life
    monkeypatch.setattr(linear_module, "SMALL_PRODUCT", 0)
    monkeypatch.setattr(linear_module, "SMALL_WEIGHT", 0)
    monkeypatch.setattr(linear_module, "fp32_gemm", lambda g=linear_module.fp32_gemm(): (g[0], 2))
    model = build(kind, topo)
    before_modules = dict(model.named_modules())
    before_types = {name: type(m) for name, m in before_modules.items()}
    sampler, cls = model.mesh_sampler, type(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = outputs(model, features)
        assert patch(model) is model
        attn = attention_modules(model)
        assert attn and all(isinstance(m, AdjacencyMultiheadAttention) for m in attn.values())
        assert isinstance(model.mesh_sampler, MeshSampler)
        assert model.state_dict().keys() == state.keys()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
        got = outputs(model, features)
        assert_close_all(got, ref, **TOL)
        params = {id(p) for p in model.parameters()}
        if linear_module._MKL or linear_module._ONEDNN:
            assert any(key[0] in params for key in linear_module._DERIVED.copy()), "no linear ran on packed weights"
        unpatch(model)
        assert not any(key[0] in params for key in linear_module._DERIVED.copy())  # the packed copies are released
        back = outputs(model, features)
    assert type(model) is cls and model.mesh_sampler is sampler
    assert all(model.get_submodule(name) is m for name, m in before_modules.items() if name)
    assert all(type(m) is before_types[name] for name, m in model.named_modules())
    for u, v in zip(back, ref):
        assert torch.equal(u, v)


@pytest.mark.filterwarnings("ignore:TORE_KERNELS_BACKEND=triton cannot run mesh_upsample")
def test_patch_matches_eager_through_triton_kernels(topo, features, triton_backend):
    # the fused ITP and the mesh-mask attention through their Triton kernels (interpreted when there is no GPU)
    model, features = build("tore_itp", topo).to(triton_backend), features.to(triton_backend)
    with torch.no_grad():
        ref = outputs(model, features)
        assert_close_all(outputs(patch(model), features), ref, **TOL)


def test_report_names_what_was_swapped(topo):
    model = build("tore_itp", topo)
    assert patch_report(model) is None
    patch(model)
    report = patch_report(model)
    assert isinstance(report, PatchReport) and report.model == "TORE-FastMETRO (ITP + GTR)"
    paths = {path: new for path, _, new in report.swapped}
    assert "mesh mask" in paths["transformer_3.decoder.layers.0.self_attn"]
    assert "weights skipped" in paths["transformer_1.encoder.layers.0.self_attn"]
    assert "mesh mask" not in paths["transformer_1.decoder.layers.0.self_attn"]  # no mask in transformer_1/2
    assert "mesh_sampler" in paths and "forward" in paths
    assert "transformer_3.decoder.self_attn" in str(report)
    fm = patch(build("fastmetro", topo))
    masked = {p for p, _, new in patch_report(fm).swapped if "mesh mask" in new}
    assert masked == {"transformer_1.decoder.layers.0.self_attn", "transformer_2.decoder.layers.0.self_attn"}
    gtr = patch(build("tore_gtr", topo))
    assert "forward" not in {p for p, _, _ in patch_report(gtr).swapped}
    metro = patch(build("tore_metro", topo))
    assert patch_report(metro).model == "TORE-METRO"
    swapped = {p: new for p, _, new in patch_report(metro).swapped}
    assert {p for p, new in swapped.items() if "mesh mask" in new} == {"transformer_3.decoder.layers.0.self_attn"}
    assert "mesh_sampler" in swapped and not any(p.startswith("trans_encoder") for p in swapped)


def test_first_vertex_layer_shares_self_attention_over_the_batch(topo, features):
    model = patch(build("tore_itp", topo))
    batches = []
    layer = model.transformer_3.decoder.layers[0]
    layer.self_attn.register_forward_hook(lambda mod, args, out: batches.append(args[0].shape[1]))
    with torch.no_grad():
        outputs(model, features)
        assert batches == [1]  # the broadcast vertex queries: one self-attention for the whole batch
        # and the layer gives what it gives on the same queries materialised per sample
        tgt = torch.randn(431, 1, 32).expand(-1, 3, -1)
        memory, pos = torch.randn(14, 3, 32), torch.randn(14, 3, 32)
        kw = dict(tgt_mask=model.attention_mask, pos=pos, query_pos=torch.zeros(431, 3, 32))
        torch.testing.assert_close(layer(tgt, memory, **kw), layer(tgt.contiguous(), memory, **kw), **TOL)
    assert batches == [1, 1, 3]


@pytest.mark.parametrize("kind", ["fastmetro", "tore_gtr"])
def test_repeated_decoder_tokens_share_the_first_self_attention(kind, topo, features):
    # FastMETRO's forward repeats its joint and vertex tokens over the batch (a copy, not a stride-0 view): the
    # patched transformer sees that they are equal and runs the first decoder self-attention on one sample
    model = build(kind, topo)
    with torch.no_grad():
        ref = outputs(model, features)
        patch(model)
        batches = []
        decoder = model.transformer_1.decoder.layers
        for layer in decoder:
            layer.norm1.register_forward_hook(lambda mod, args, out: batches.append(args[0].shape[1]))
        assert_close_all(outputs(model, features), ref, **TOL)
    assert batches == [1] + [features.shape[0]] * (len(decoder) - 1)
    x = torch.randn(5, 1, 8).repeat(1, 3, 1)
    assert layers.same_over_batch(x).stride(1) == 0 and torch.equal(layers.same_over_batch(x), x)
    x[4, 2, 7] += 1  # one value differs: per-sample tokens stay as they are
    assert layers.same_over_batch(x) is x


@pytest.mark.parametrize("kind", ["fastmetro", "tore_itp", "tore_gtr"])
def test_token_embedding_self_attention_is_computed_once(kind, topo):
    # the first decoder layers whose queries are the token embeddings run their self-attention block on the first
    # call only; new weights (in place or loaded), another mask, other queries or grad mode compute it again
    model = build(kind, topo)
    patched = patch(copy.deepcopy(model))
    cached = {name: m for name, m in patched.named_modules() if layers.QUERY_SOURCES in m.__dict__}
    masked = "transformer_1.decoder.layers.0" if kind == "fastmetro" else "transformer_3.decoder.layers.0"
    assert set(cached) == {"transformer_1.decoder.layers.0", masked}
    runs = []
    for name, layer in cached.items():
        layer.norm1.register_forward_hook(lambda mod, args, out, name=name: runs.append(name))

    def check(expected, batch=2, grad=False):
        x = torch.randn(batch, C_BACKBONE, 7, 7)
        with torch.set_grad_enabled(grad):
            assert_close_all([o.detach() for o in outputs(patched, x)], [o.detach() for o in outputs(model, x)],
                             **TOL)
        assert sorted(runs) == sorted(expected)
        runs.clear()

    with torch.inference_mode():
        outputs(patched, torch.randn(2, C_BACKBONE, 7, 7))
    assert sorted(runs) == sorted(cached) and not any(
        t.is_inference() for m in cached.values() for t in layers._INVARIANT[m][2] if t is not None)
    runs.clear()
    check([], batch=1)  # new images, another batch size: the same block
    check([], batch=3)
    for m in (model, patched):  # in place: the vertex tokens are queries of FastMETRO's first layer and the NSR's
        with torch.no_grad():
            m.vertex_token_embed.weight.mul_(1.5)
    check([masked])
    for m in (model, patched):
        m.load_state_dict(build(kind, topo, seed=3).state_dict())
    check(cached)
    mask = model.attention_mask
    i, j = next((i, j) for i in range(20, len(mask)) for j in range(len(mask)) if i != j and not mask[i, j])
    for m in (model, patched):
        m.attention_mask[i, j] = True  # one neighbour less
    check([masked])
    check(cached, grad=True)
    check(cached, grad=True)
    # other queries given to the layer itself: computed, and not cached
    layer, original = cached[masked], model.get_submodule(masked)
    queries, width = sum(len(p) for p in layer.__dict__[layers.QUERY_SOURCES]), original.norm1.weight.shape[0]
    tgt, memory, pos = torch.randn(queries, 1, width), torch.randn(14, 1, width), torch.randn(14, 1, width)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(layer(tgt, memory, tgt_mask=mask, pos=pos),
                                       original(tgt, memory, tgt_mask=mask, pos=pos), **TOL)
    assert runs == [masked, masked]
    runs.clear()
    check([])
    unpatch(patched)
    assert not any(layers.QUERY_SOURCES in m.__dict__ for m in patched.modules())
    assert not any(m in layers._INVARIANT for m in patched.modules())
    assert set(patched.state_dict()) == set(model.state_dict())


def test_idempotent(topo, features):
    model = patch(build("tore_itp", topo))
    modules, report, cls = dict(model.named_modules()), patch_report(model), type(model)
    assert patch(model) is model
    assert patch_report(model) is report and type(model) is cls
    assert all(model.get_submodule(name) is m for name, m in modules.items() if name)
    unpatch(model)
    unpatch(model)  # unpatching an unpatched model changes nothing
    assert patch_report(model) is None and type(model) is ToreFastMETROHead


@pytest.mark.parametrize("kind", ["tore_itp", "fastmetro", "tore_metro"])
def test_state_dict_round_trip(kind, topo, features):
    patched = patch(build(kind, topo, seed=1))
    plain = build(kind, topo, seed=2)
    with torch.no_grad():
        ref_patched = outputs(patched, features)
        ref_plain = outputs(plain, features)
        buffer = io.BytesIO()
        torch.save(patched.state_dict(), buffer)
        buffer.seek(0)
        fresh = build(kind, topo, seed=3)
        fresh.load_state_dict(torch.load(buffer, weights_only=True))  # strict: same keys
        assert_close_all(outputs(fresh, features), ref_patched, **TOL)
        patched.load_state_dict(plain.state_dict())
        assert_close_all(outputs(patched, features), ref_plain, **TOL)


def test_parameters_are_shared_not_copied(topo):
    model = build("tore_gtr", topo)
    params = dict(model.named_parameters())
    patch(model)
    # optimisers and DDP hold these objects: they must stay the model's parameters
    assert all(p is params[name] for name, p in model.named_parameters())


def test_data_parallel_wrapper(topo, features):
    model = build("tore_itp", topo)
    with torch.no_grad():
        ref = outputs(model, features)
    wrapped = nn.DataParallel(model)  # with no GPU it just calls the module
    assert patch(wrapped) is wrapped
    assert patch_report(wrapped) is patch_report(model) is not None
    with torch.no_grad():
        assert_close_all(outputs(wrapped, features), ref, **TOL)
    unpatch(wrapped)
    assert patch_report(model) is None and type(model) is ToreFastMETROHead


def test_patched_model_pickles_and_deepcopies(topo, features):
    model = patch(build("tore_itp", topo))
    with torch.no_grad():
        ref = outputs(model, features)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert patch_report(clone) is not None and isinstance(clone, ToreFastMETROHead)
            for u, v in zip(outputs(clone, features), ref):
                assert torch.equal(u, v)
            unpatch(clone)
            assert type(clone) is ToreFastMETROHead


def test_unknown_model_raises_and_is_untouched(topo):
    with pytest.raises(ValueError, match="Looked for"):
        patch(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="nn.Module"):
        patch("model")
    # nearly right: every check runs before any swap, so transformer_1/2 must not be half-patched
    model = build("tore_itp", topo)
    model.transformer_3.decoder.layers[0].multihead_attn = nn.Identity()
    modules, sampler = dict(model.named_modules()), model.mesh_sampler
    with pytest.raises(ValueError, match="transformer_3.decoder.layers.0.multihead_attn"):
        patch(model)
    assert all(model.get_submodule(name) is m for name, m in modules.items() if name)
    assert model.mesh_sampler is sampler and type(model) is ToreFastMETROHead and patch_report(model) is None
    model = build("fastmetro", topo)
    del model.mesh_sampler
    with pytest.raises(ValueError, match="mesh_sampler missing"):
        patch(model)
    assert not any(isinstance(m, AdjacencyMultiheadAttention) for m in model.modules())
    model = build("tore_metro", topo)
    del model.trans_encoder  # transformer_3 alone is not enough to call it TORE-METRO
    with pytest.raises(ValueError, match="trans_encoder"):
        patch(model)
    assert not any(isinstance(m, AdjacencyMultiheadAttention) for m in model.modules())


@pytest.mark.parametrize("mode", ["train", "eval"])  # eval with autograd: the patched fast forwards' backward
@pytest.mark.parametrize("kind", ["tore_itp", "fastmetro", "tore_metro"])
def test_train_mode_gradients_match(kind, mode, topo, features):
    eager = build(kind, topo, dropout=0.0).train(mode == "train")
    fast = patch(copy.deepcopy(eager))
    x1 = features.clone().requires_grad_(True)
    x2 = features.clone().requires_grad_(True)
    out1, out2 = outputs(eager, x1), outputs(fast, x2)
    torch.manual_seed(3)
    weights = [torch.randn_like(o) for o in out1]
    sum(((o * w).sum() for o, w in zip(out1, weights))).backward()
    sum(((o * w).sum() for o, w in zip(out2, weights))).backward()
    torch.testing.assert_close(x2.grad, x1.grad, **TOL)
    grads = {n: p.grad for n, p in eager.named_parameters()}
    for name, p in fast.named_parameters():
        assert p.grad is not None, name
        # a weight gradient sums up to B x 6890 products (the regressors see every upsampled vertex): its
        # rounding error scales with its largest entry, not with each entry, so atol is relative to that
        ref = grads[name]
        if name == "token_selector_fc.bias" or name.endswith("attention.self.key.bias"):
            # exactly zero in exact arithmetic (a softmax ignores a shift common to all its logits: the heatmap's
            # per-cluster shift over HW, a BERT key bias adds q.b to every key): both sides are rounding noise,
            # bounded by the scale of the matching weight's gradient
            bound = 1e-5 * float(grads[name[:-len("bias")] + "weight"].abs().max())
            assert float(p.grad.abs().max()) <= bound and float(ref.abs().max()) <= bound
            continue
        torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()) + 1e-7,
                                   msg=lambda m: f"{name}: {m}")


def weighted_sum_grads(model, x, weights):
    """d(sum_i <out_i, w_i>)/d(input, parameters) by name."""
    x = x.clone().requires_grad_(True)
    for p in model.parameters():
        p.grad = None
    sum(((o * w.to(o.dtype)).sum() for o, w in zip(outputs(model, x), weights))).backward()
    return x.grad, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_gradients_after_an_inference_call(kind, mode, topo, features):
    """Evaluate under inference_mode / no_grad, then differentiate (test-time optimisation, saliency maps): what
    the patched model cached there (neighbour tables, few-key tables, packed weights, upsampling chains) must not
    be inference tensors autograd cannot save, and the gradients must be right: compared with a float64 copy of
    the eager model (fp32 eager's own error is of the same order as the patched model's)."""
    eager = build(kind, topo, dropout=0.0)
    exact = copy.deepcopy(eager).double().train(mode == "train")
    torch.manual_seed(3)
    with torch.no_grad():
        weights = [torch.randn_like(o) for o in outputs(exact, features.double())]
    gx64, grads64 = weighted_sum_grads(exact, features.double(), weights)
    for first in (torch.inference_mode, torch.no_grad):
        fast = patch(copy.deepcopy(eager))
        with first():
            fast(features)  # eval mode: the inference paths fill their caches
        fast.train(mode == "train")
        gx, grads = weighted_sum_grads(fast, features, weights)
        torch.testing.assert_close(gx.double(), gx64, rtol=1e-4, atol=1e-5 * float(gx64.abs().max()))
        for name, g in grads.items():
            ref = grads64[name]
            assert g is not None, name
            if name == "token_selector_fc.bias" or name.endswith("attention.self.key.bias"):
                # zero in exact arithmetic (see test_train_mode_gradients_match): fp32 rounding noise, bounded by
                # the scale of the matching weight's gradient
                bound = 1e-5 * float(grads64[name[:-len("bias")] + "weight"].abs().max())
                assert float(g.abs().max()) <= bound, name
                continue
            # rounding error of a weight gradient scales with its largest entry (see test_train_mode_gradients_match)
            tol = 1e-5 * float(ref.abs().max()) + 1e-7
            torch.testing.assert_close(g.double(), ref, rtol=1e-4, atol=tol,
                                       msg=lambda m: f"{first.__name__}, {name}: {m}")


# patch(dtype=torch.bfloat16): linears, convs and attention take bf16 inputs (8 significant bits: each rounding is
# at most 2^-9 relative). The ~10 residual blocks add such perturbations roughly independently, so the outputs are
# off by a few 2^-9 of their range: measured <= 0.8 % of each output's range (max - min) over these four models x
# 3 seeds. 2 % (~10 x 2^-9) leaves margin; a wrong mask or weight gives errors of the order of the range itself.
BF16_BOUND = 0.02
native_bf16 = pytest.mark.skipif(not linear_module.bf16_native(), reason="this CPU has no native bf16: patch runs "
                                 "fp32 there (test_bf16_falls_back_to_fp32_without_native_bf16)")


@native_bf16
@pytest.mark.parametrize("kind", list(KINDS))
def test_bf16_error_bounded_outputs_fp32_state_unchanged(kind, topo, features):
    model = build(kind, topo)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = outputs(model, features)
        patch(model, dtype=torch.bfloat16)
        assert "bf16 autocast" in str(patch_report(model))
        assert patch(model, dtype=torch.bfloat16) is model  # idempotent
        with pytest.raises(ValueError, match="dtype"):
            patch(model)  # another dtype: unpatch first
        got = outputs(model, features)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert model.state_dict().keys() == state.keys()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
        for i, (g, r) in enumerate(zip(got, ref)):
            assert g.dtype == torch.float32 and g.shape == r.shape, f"output {i}"
            error = float((g - r).abs().max()) / float(r.max() - r.min())
            # above fp32 noise (~1e-6): bf16 really ran; below the bound: it ran where it is safe
            assert 1e-4 < error <= BF16_BOUND, f"output {i}: error {error:.2e} of its range"
        unpatch(model)
        assert all(torch.equal(u, v) for u, v in zip(outputs(model, features), ref))
    assert not any(isinstance(m, AdjacencyMultiheadAttention) for m in model.modules())


@native_bf16
@pytest.mark.parametrize("kind", ["tore_itp", "tore_metro"])
def test_bf16_train_mode_gradients_flow(kind, topo, features):
    eager = build(kind, topo, dropout=0.0).train()
    fast = patch(copy.deepcopy(eager), dtype=torch.bfloat16)
    torch.manual_seed(3)
    weights = [torch.randn_like(o) for o in outputs(eager, features)]
    for model in (eager, fast):
        sum(((o * w).sum() for o, w in zip(outputs(model, features), weights))).backward()
    grads = dict(eager.named_parameters())
    for name, p in fast.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and bool(p.grad.isfinite().all()), name
    # all gradients as one vector: same direction and size as fp32's up to bf16 rounding (a few 2^-9 per block)
    g16 = torch.cat([p.grad.flatten() for _, p in fast.named_parameters()])
    g32 = torch.cat([grads[n].grad.flatten() for n, _ in fast.named_parameters()])
    assert float((g16 - g32).norm() / g32.norm()) <= BF16_BOUND


def test_bf16_bad_dtype_raises(topo):
    model = build("tore_gtr", topo)
    with pytest.raises(ValueError, match="dtype"):
        patch(model, dtype=torch.float16)
    with pytest.raises(ValueError, match="fp32 model"):
        patch(model.double(), dtype=torch.bfloat16)
    assert patch_report(model) is None


@native_bf16
def test_bf16_weight_copies_follow_new_weights(topo, features):
    # the cached bf16 weight copies are keyed on the parameter's version: loading new weights must be seen
    model = patch(build("tore_itp", topo, seed=1), dtype=torch.bfloat16)
    other = build("tore_itp", topo, seed=2)
    with torch.no_grad():
        outputs(model, features)  # fills the cache
        model.load_state_dict(other.state_dict())
        ref = outputs(other, features)
        for i, (g, r) in enumerate(zip(outputs(model, features), ref)):
            assert float((g - r).abs().max()) <= BF16_BOUND * float(r.max() - r.min()), f"output {i}"


@pytest.mark.parametrize("native", [False, True])
def test_bf16_only_where_the_cpu_has_it(native, topo, features, monkeypatch):
    """One predicate (ops.linear.bf16_native) decides: without native bf16, patch(dtype=bf16) runs fp32 with one
    warning and says so in the report, and no linear packs bf16 weights (oneDNN refuses them there); with it, the
    forward runs under bf16 autocast (run here only where the CPU really has it)."""
    monkeypatch.setattr(linear_module, "bf16_native", lambda: native)
    model = build("tore_itp", topo)
    with torch.no_grad():
        ref = outputs(model, features)
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch(model, dtype=torch.bfloat16)
        patch(model, dtype=torch.bfloat16)  # idempotent: no second warning
    fallback = [w for w in caught if "no native bf16" in str(w.message)]
    report = str(patch_report(model))
    if native:
        assert not fallback and "bf16 autocast" in report
        if not backend.bf16_native():
            return  # the faked branch is planned; running it needs the real instructions
    else:
        assert len(fallback) == 1 and issubclass(fallback[0].category, RuntimeWarning)
        assert "no native bf16" in report and "bf16 autocast" not in report
    with torch.no_grad():
        got = outputs(model, features)
    params = {id(p) for p in model.parameters()}
    bf16_packed = [k for k in linear_module._DERIVED.copy() if k[0] in params and "bfloat16" in k[1]]
    if native:
        assert bf16_packed
        assert any(float((g - r).abs().max()) > 1e-4 * float(r.max() - r.min()) for g, r in zip(got, ref))
    else:
        assert not bf16_packed
        assert_close_all(got, ref, **TOL)  # fp32: eager's numbers
    assert patch_report(unpatch(model)) is None


def test_backbone_forwards_planned_and_opt_out(monkeypatch):
    """patch(backbone=True) adds patch/backbone.py's backbone_forwards(model.backbone) to the plan (before the
    generic swaps: each module gets one forward) and unpatch undoes them; backbone=False touches nothing under
    model.backbone. The model's forward(images) calls the backbone either way."""
    patch_module = importlib.import_module("tore_kernels.patch")
    from tore_reference import released
    calls = []

    def traced_forward(self, x):  # a stand-in fast forward: the module's own, counted
        calls.append(type(self).__name__)
        return type(self).__bases__[0].forward(self, x)

    monkeypatch.setattr(patch_module, "backbone_forwards",
                        lambda net: [(m, traced_forward) for m in net.modules() if isinstance(m, nn.Conv2d)])
    model = released.nontrivial_norms(released.build_tore_fastmetro(tiny=True)).eval()
    images = released.example_images(2, tiny=True)
    convs = [m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        ref = model(images)
        patch(model, dtype=torch.bfloat16 if linear_module.bf16_native() else None)
        assert all(type(m).forward is traced_forward for m in convs)  # not the bf16 conv forward
        got = model(images)
        assert len(calls) == len(convs)
        if not linear_module.bf16_native():
            assert_close_all(got, ref, **TOL)
        unpatch(model)
        assert all(type(m) is nn.Conv2d for m in convs)
        types = {name: type(m) for name, m in model.backbone.named_modules()}
        patch(model, backbone=False)
        assert {name: type(m) for name, m in model.backbone.named_modules()} == types
        assert_close_all(model(images), ref, **TOL)
    assert len(calls) == len(convs)
    with pytest.raises(TypeError, match="backbone"):
        patch(unpatch(model), backbone="yes")


_MALLOC_PROBE = """
import os, sys, torch
from tore_kernels import backend
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
print(backend.tune_malloc())
before = rss()
x = torch.ones(300 << 18)  # 300 MiB
del x
print((rss() - before) >> 20)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm") or platform.libc_ver()[0] != "glibc",
                    reason="glibc on Linux only")
@pytest.mark.parametrize("env", [{}, {"TORE_KERNELS_MALLOC": "0"}, {"MALLOC_ARENA_MAX": "2"}],
                         ids=["tuned", "opted-out", "user-set"])
def test_malloc_keeps_freed_blocks_unless_told_not_to(env, topo):
    # tuned, a freed 300 MiB block stays with the process for the next forward (no page faults on reuse); opted
    # out or set by the user, glibc maps it fresh and returns it when freed
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "TORE_KERNELS_MALLOC"}
    out = subprocess.run([sys.executable, "-c", _MALLOC_PROBE], env={**environ, **env}, capture_output=True,
                         text=True, check=True).stdout.split("\n")
    kept_mib = int(out[1])
    if env:
        assert out[0].startswith("left as") and kept_mib < 50, out
    else:
        assert out[0].startswith("keeps freed blocks") and kept_mib > 250, out
    model = patch(build("tore_gtr", topo))
    assert ("(process)", "glibc malloc", backend.tune_malloc()) in patch_report(model).swapped


def test_position_sequences_are_kept_per_shape_and_settings():
    """TORE-FastMETRO's patched forward keeps a parameter-free encoding's sequence per shape until unpatch; a changed
    setting or a learned encoding computes it again, and one first made under inference_mode is a normal tensor."""
    from tore_kernels.patch.layers import forget_invariants
    from tore_kernels.patch.layers import position_sequence as _sequence
    from tore_reference.position_encoding import PositionEmbeddingSine

    def released(encoding, batch, tokens):
        return encoding(batch, tokens, 1, torch.device("cpu")).flatten(2).permute(2, 0, 1)

    sine = PositionEmbeddingSine(32, normalize=True)
    with torch.inference_mode():
        first = _sequence(sine, 2, 39, torch.device("cpu"), torch.float32)
    assert not first.is_inference()
    assert torch.equal(first, released(sine, 2, 39))
    assert _sequence(sine, 2, 39, torch.device("cpu"), torch.float32) is first
    assert torch.equal(_sequence(sine, 3, 14, torch.device("cpu"), torch.float32), released(sine, 3, 14))
    sine.temperature = 100
    changed = _sequence(sine, 2, 39, torch.device("cpu"), torch.float32)
    assert torch.equal(changed, released(sine, 2, 39)) and not torch.equal(changed, first)
    forget_invariants([sine])  # what unpatch calls
    assert _sequence(sine, 2, 39, torch.device("cpu"), torch.float32) is not changed

    class Learned(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(8, 39))

        def forward(self, batch, h, w, device):
            return self.table[:, :h, None].expand(batch, -1, -1, w)

    learned = Learned()
    before = _sequence(learned, 2, 39, torch.device("cpu"), torch.float32).clone()
    with torch.no_grad():
        learned.table.add_(1.0)
    assert torch.equal(_sequence(learned, 2, 39, torch.device("cpu"), torch.float32), before + 1.0)
