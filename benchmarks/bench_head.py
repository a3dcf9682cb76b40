"""The released networks (``tore_reference.released``: images in, their own backbone, released forwards) eager vs
the same instance after ``tore_kernels.patch`` (fp32, and ``dtype=torch.bfloat16`` where the CPU has native
bf16), and, for the head, vs ``torch.compile`` of the patched model. Two rows per network and batch: the backbone
included (torchvision's ResNet-50 when torchvision is installed, else a small random ResNet-style CNN, named in the row),
and an identity backbone over precomputed ``[B, 2048, 7, 7]`` features (the head alone). TORE-FastMETRO-L ITP+GTR,
FastMETRO-L body, TORE-METRO (its NSR ``transformer_3`` after METRO's encoder) and METRO (its 445-token BERT
encoder); released L sizes, random weights, eval mode, no_grad. ``gemm``: a plain fp32 vs bf16 matmul; ``linear``: the
packed inference linear vs F.linear on the head's shapes."""
import copy

import torch
from torch import nn

from tore_kernels.ops.linear import bf16_native
from tore_kernels.patch import patch
from tore_reference import released
from tore_benchmarks.harness import Case, entry


def _no_grad(fn, *args):
    def call():
        with torch.no_grad():
            return fn(*args)
    return call


def _backbone():
    try:
        return released.resnet50_backbone(), "ResNet-50"
    except ImportError:  # no torchvision
        return released.small_backbone(2048, stride=32, width=64), "ResNet-style (small)"


def _networks(device):
    """(name, builder(backbone) -> model, extra forward args) of the released networks."""
    device = torch.device(device)
    smpl, sampler = released.TemplateSMPL().to(device), released.mesh_sampler("smpl")
    return (
        ("TORE-FastMETRO-L ITP+GTR", lambda bb: released.build_tore_fastmetro(backbone=bb), ()),
        ("FastMETRO-L body", lambda bb: released.build_fastmetro(backbone=bb), ()),
        ("TORE-METRO (encoder + NSR)", lambda bb: released.build_metro(tore=True, backbone=bb, device=device),
         (smpl, sampler)),
        ("METRO (445-token encoder)", lambda bb: released.build_metro(tore=False, backbone=bb, device=device),
         (smpl, sampler)),
    )


@entry("head")
def head(device, quick):
    torch.manual_seed(0)
    backbone, backbone_name = _backbone()
    batches = {"identity": (1, 2) if quick else (1, 32), backbone_name: (1,) if quick else (1, 8)}
    for i, (name, build, extra) in enumerate(_networks(device)):
        for bb_name, bb in (("identity", nn.Identity()), (backbone_name, backbone)):
            eager = build(copy.deepcopy(bb)).to(device).eval()
            variants = {"eager": eager, "patched": patch(copy.deepcopy(eager))}
            if bf16_native():  # elsewhere patch(dtype=bf16) runs fp32 (the "patched" row)
                variants["patched bf16"] = patch(copy.deepcopy(eager), dtype=torch.bfloat16)
            if bb_name == "identity" and (not quick or not i):  # the head (compile times: one network in --quick)
                variants["compile(patched)"] = torch.compile(patch(copy.deepcopy(eager)))
            for batch in batches[bb_name]:
                x = (torch.randn(batch, 2048, 7, 7, device=device) if bb_name == "identity"
                     else released.example_images(batch, tiny=False).to(device))
                # the harness's warm-up calls do the one-time work (tables, packing, compilation), and record a
                # failing variant in its row instead of ending the entry
                yield Case("head", {"model": name, "backbone": bb_name, "batch": batch, "dtype": "fp32"},
                           {v: _no_grad(m, x, *extra) for v, m in variants.items()},
                           reps=7 if batch > 1 else None)  # a batch-8/32 network call takes seconds


@entry("gemm")
def gemm(device, quick):
    """What bf16 can give on this machine: one 2048^3 matmul, fp32 vs bf16 (oneDNN; AMX or avx512_bf16 on CPU,
    tensor cores on GPU). The ratio bounds what patch(dtype=torch.bfloat16) can gain on the head's GEMMs."""
    n = 512 if quick else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a16, b16 = a.bfloat16(), b.bfloat16()
    yield Case("gemm", {"m=n=k": n}, {"fp32": lambda: a @ b, "bf16": lambda: a16 @ b16})


# (rows, in, out) of the head's linears: one sample's joint tokens (14), image tokens (40), vertex tokens (431),
# and their batch-32 counts; with a single row and the smallest weights, which linear leaves to F.linear
LINEAR_SHAPES = ((1, 512, 512), (14, 128, 128), (14, 512, 2048), (14, 2048, 512), (40, 512, 512), (40, 2048, 512),
                 (431, 128, 512), (1280, 512, 2048), (1280, 2048, 512), (13792, 512, 128))


@entry("linear")
def linear_paths(device, quick):
    """``tore_kernels.ops.linear.linear`` (in inference: few_rows_linear for a few rows, MKL's or oneDNN's packed
    GEMM, or F.linear for small products) vs ``F.linear`` and vs the same linear without few_rows_linear ("packed
    GEMM"), on the head's shapes, over 8 weights in turn, as a forward reads them (from memory, not cache)."""
    from torch.nn import functional as F

    from tore_kernels.ops import linear as linear_module

    shapes = LINEAR_SHAPES[:3] if quick else LINEAR_SHAPES
    for m, k, n in shapes:
        weights = [nn.Parameter(torch.randn(n, k, device=device)) for _ in range(8)]
        x = torch.randn(m, k, device=device)

        def run(fn, few_rows=True):
            def call():
                saved = linear_module.FEW_ROWS
                linear_module.FEW_ROWS = saved if few_rows else {}
                try:
                    with torch.no_grad():
                        for w in weights:
                            fn(x, w)
                finally:
                    linear_module.FEW_ROWS = saved
            return call
        variants = {"F.linear": run(F.linear), "packed GEMM": run(linear_module.linear, few_rows=False),
                    "patched": run(linear_module.linear)}
        yield Case("linear", {"rows": m, "in": k, "out": n}, variants)
