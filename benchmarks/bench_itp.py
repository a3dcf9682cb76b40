"""Image Token Pruner: eager (tore_reference) vs its conv3x3 alone (the floor) vs tore-kernels."""
import torch
import torch.nn.functional as F

import tore_reference
from tore_kernels.ops import itp as itp_ops
from tore_kernels.ops.itp import image_token_prune
from tore_benchmarks.harness import Case, entry


def _no_grad(fn):
    def call():
        with torch.no_grad():
            return fn()
    return call


@entry("itp")
def itp(device, quick):
    C, H, W, N = 512, 7, 7, 39  # TORE-FastMETRO: 512 channels on a 7x7 grid, keep ratio 0.8
    torch.manual_seed(0)
    ref = tore_reference.ImageTokenPruner(C, N).to(device).eval()
    conv, fc, ln = ref.token_selector_conv2d, ref.token_selector_fc, ref.layer_norm
    params = (conv.weight, conv.bias, fc.weight, fc.bias, ln.weight, ln.bias)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    for batch in ((1, 32) if quick else (1, 16, 32)):
        x = torch.randn(batch, C, H, W, device=device)
        # the fewest bytes: features and parameters read once, heatmap [B, N, HW] and tokens [B, N, C] written once
        fewest = (x.numel() + batch * N * (H * W + C)) * x.element_size() + param_bytes
        yield Case("itp", {"batch": batch, "C": C, "grid": f"{H}x{W}", "N": N, "dtype": "fp32"}, {
            "eager": _no_grad(lambda x=x: ref(x)),
            "conv3x3 alone": _no_grad(lambda x=x: F.conv2d(x, conv.weight, conv.bias, padding=1)),
            "tore-kernels": _no_grad(lambda x=x: image_token_prune(x, *params, eps=ln.eps)),
        }, bytes=fewest)
        if torch.device(device).type == "cpu" and itp_ops.HAS_POST_CONV_OP:
            # everything after the conv (what the C++ op fuses): the torch sequence vs the op, on the conv's output
            with torch.no_grad():
                h = F.conv2d(x, conv.weight, conv.bias, padding=1)
            rest = (x, fc.weight, fc.bias, ln.weight, ln.bias)
            part = {"batch": batch, "C": C, "grid": f"{H}x{W}", "N": N, "dtype": "fp32", "part": "post-conv"}
            yield Case("itp", part, {
                "torch sequence": _no_grad(lambda h=h, rest=rest: itp_ops._post_conv_torch(h, *rest, ln.eps)),
                "C++ op": _no_grad(lambda h=h, rest=rest: torch.ops.tore_kernels.image_token_prune_post_conv(
                    h, *rest, ln.eps, False)),
            })
