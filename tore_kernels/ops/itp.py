"""Image Token Pruner (tore-model.md section 1), fused.

``image_token_prune`` computes, per sample, ``A = softmax_HW(fc(GELU(conv3x3(F))))`` (the heatmap
``[N, HW]``) and ``LayerNorm_[N,C](A @ F_flat)`` (the tokens ``[N, C]``). Implementations:

* ``reference``: the eager sequence exactly as the released code writes it (the fallback).
* ``cpu`` on CPU tensors where the C++ kernels run an AVX2 or AVX-512 clone (``uses_post_conv_op``): the conv
  (:func:`~tore_kernels.ops.conv.conv2d`: oneDNN, on the weight reordered once per input shape at small sizes),
  then one C++ op (``torch.ops.tore_kernels.image_token_prune_post_conv``, csrc/itp/itp_cpu.cpp) for GELU, fc,
  softmax, ``A @ F`` and LayerNorm in a single parallel loop over the batch.
* ``cpu`` elsewhere (other CPUs too) (and the recompute in backward): the same maths in torch, everything after the conv reshaped
  so no transpose or copy is made:
  the linear applied as ``fc_weight @ h`` (one baddbmm with the bias) so the logits come out
  already in the heatmap layout ``[B, N, HW]`` (softmax then runs over the contiguous axis), the
  projection as one ``bmm`` against a transposed view of ``F``, and one ``layer_norm`` call.
  Device-agnostic plain torch; it is also what the Triton path's backward recomputes.
* ``triton``: two launches. Kernel 1 is an implicit GEMM for the conv (K = 9*C, im2col gathered on the
  fly) whose output tile goes through bias + exact GELU and straight into the linear, so the GELU
  activations never reach global memory; it writes only the fp32 logits ``[B, N, HW]`` (into the
  heatmap buffer itself when that is fp32). Kernel 2, one program per sample, runs the softmax over
  HW, stores the heatmap, computes the tokens ``A @ F`` tile by tile while merging the LayerNorm
  statistics (Chan's parallel mean/M2 in fp32), then recomputes each tile and stores it normalised. The split is
  there because the softmax needs every position of a sample, which a conv tile does not own.
  The launches are registered as ``torch.ops.tore_kernels.image_token_prune_triton`` (``torch.library.triton_op``,
  so torch.compile sees the kernels); its backward (``register_autograd``) recomputes the forward with the
  ``cpu`` sequence's torch ops and differentiates that: the heatmap and the tokens both carry gradients.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from .. import backend
from .conv import conv2d
from .kernel_config import KernelConfig

OP = "image_token_prune"
# The C++ post-conv op runs where one of its SIMD clones does. Its baseline build (x86 without AVX2, aarch64) splits
# each 32-byte vector op: measured ~50x slower than the AVX2 clone and slower than torch's own ops, which run there.
POST_CONV_OP_ISAS = ("avx2", "avx512")


def uses_post_conv_op() -> bool:
    """Whether the cpu implementation runs the C++ post-conv op on this CPU (else torch's ops after the conv)."""
    return HAS_POST_CONV_OP and backend.cpu_isa() in POST_CONV_OP_ISAS


def _cpu_path() -> str:
    return f"conv + {backend.clone_path()}" if uses_post_conv_op() else "torch ops (faster than the baseline C++ build)"


backend.register(OP, cpu_path=_cpu_path, reference=None, cpu=None, triton="triton")

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_TRITON_HW = 256  # kernel 2 holds a whole row of the heatmap in registers


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def _check_inputs(features, conv_weight, conv_bias, fc_weight, fc_bias, ln_weight, ln_bias, eps):
    named = dict(features=features, conv_weight=conv_weight, conv_bias=conv_bias, fc_weight=fc_weight,
                 fc_bias=fc_bias, ln_weight=ln_weight, ln_bias=ln_bias)
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"image_token_prune: {name} must be a torch.Tensor, got {type(t).__name__}")
    if features.dim() != 4:
        raise ValueError(f"image_token_prune: features must be [B, C, H, W], got shape {tuple(features.shape)}")
    if features.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"image_token_prune: features must be float32, float16, bfloat16 or float64, "
                        f"got {features.dtype}")
    B, C, H, W = features.shape
    if H < 1 or W < 1:
        raise ValueError(f"image_token_prune: features must have a non-empty grid, got shape {tuple(features.shape)}")
    if C < 4 or C % 4:
        raise ValueError(f"image_token_prune: features channels C must be a positive multiple of 4, got {C}")
    N = fc_weight.shape[0] if fc_weight.dim() == 2 else -1
    expected = dict(conv_weight=(C // 4, C, 3, 3), conv_bias=(C // 4,), fc_weight=(N, C // 4), fc_bias=(N,),
                    ln_weight=(N, C), ln_bias=(N, C))
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(f"image_token_prune: {name} must have shape {shape} for features with C={C}"
                             f"{'' if name.startswith('conv') else f' and N={N} tokens'}, "
                             f"got {tuple(named[name].shape)}")
    if not 1 <= N <= H * W:
        raise ValueError(f"image_token_prune: the number of tokens N (fc_weight rows) must be in [1, H*W={H * W}], "
                         f"got {N}")
    for name, t in named.items():
        if t.device != features.device:
            raise ValueError(f"image_token_prune: {name} is on {t.device}, expected features' device "
                             f"{features.device}")
        if t.dtype != features.dtype:
            raise TypeError(f"image_token_prune: {name} has dtype {t.dtype}, expected features' dtype "
                            f"{features.dtype}")
    if not isinstance(eps, (int, float)) or not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"image_token_prune: eps must be a positive finite number, got {eps!r}")


# ----------------------------------------------------------------------------------------------
# plain torch: the eager reference sequence, and the copy-free CPU sequence
# ----------------------------------------------------------------------------------------------
def _reference_forward(x, cw, cb, fw, fb, lw, lb, eps):
    """The released code's sequence, step for step (tore-model.md section 1)."""
    h = F.gelu(F.conv2d(x, cw, cb, padding=1))
    h = h.flatten(2).transpose(1, 2)
    heatmap = torch.softmax(F.linear(h, fw, fb), dim=1).transpose(1, 2)
    tokens = heatmap @ x.flatten(2).transpose(1, 2)
    return F.layer_norm(tokens, tuple(lw.shape), lw, lb, eps), heatmap


def _post_conv_torch(conv, x, fw, fb, lw, lb, eps):
    """Everything after the conv (its output ``conv`` includes the bias), with no transposes or copies."""
    B, C, H, W = x.shape
    N = fw.shape[0]
    # reshape, not view: a channels_last input gives a channels_last conv output (then one copy is made)
    h = F.gelu(conv.reshape(B, C // 4, H * W))  # (aten's in-place gelu_ is no faster)
    # fc as fc_weight @ h: logits land in [B, N, HW] (the heatmap layout), bias added by the GEMM
    logits = torch.baddbmm(fb.view(1, N, 1), fw.expand(B, N, C // 4), h)
    heatmap = torch.softmax(logits, dim=2)
    tokens = torch.bmm(heatmap, x.reshape(B, C, H * W).transpose(1, 2))
    return F.layer_norm(tokens, (N, C), lw, lb, eps), heatmap


def _torch_forward(x, cw, cb, fw, fb, lw, lb, eps):
    """Same maths as the reference, no transposes or copies after the conv."""
    return _post_conv_torch(F.conv2d(x, cw, cb, padding=1), x, fw, fb, lw, lb, eps)


def _empty_outputs(x, fw, seq_first):
    """(tokens, heatmap) shaped as the fused ops return them: their fake (meta) implementation."""
    B, C, H, W = x.shape
    N = fw.shape[0]
    return x.new_empty((N, B, C) if seq_first else (B, N, C)), x.new_empty((B, N, H * W))


def _save_for_recompute(ctx, inputs, output):
    """setup_context of the fused ops: their tensor inputs, then eps and seq_first (their last two arguments)."""
    ctx.save_for_backward(*inputs[:-2])
    ctx.eps, ctx.seq_first = inputs[-2], inputs[-1]


def _recompute_backward(forward, ctx, d_tokens, d_heatmap):
    """Backward of a fused forward whose saved tensors are ``forward``'s inputs (then eps and seq_first, not
    differentiable): recompute ``forward`` in torch and differentiate it (the conv's own backward dominates the
    cost anyway). Gradients flow from both the tokens and the heatmap."""
    inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad)]
    with torch.enable_grad():
        tokens, heatmap = forward(*inputs, ctx.eps)
    if ctx.seq_first and d_tokens is not None:
        d_tokens = d_tokens.transpose(0, 1)
    pairs = [(out, grad) for out, grad in ((tokens, d_tokens), (heatmap, d_heatmap)) if grad is not None]
    wanted = [t for t in inputs if t.requires_grad]
    grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
                 if pairs and wanted else ())
    return (*[next(grads) if t.requires_grad else None for t in inputs], None, None)


# The C++ CPU kernel (csrc/itp/itp_cpu.cpp) fuses everything after the conv into one parallel loop over the
# batch; the conv stays oneDNN's (and autograd's). Its backward recomputes _post_conv_torch from the saved
# conv output and differentiates it (cheap next to the conv's own backward).
HAS_POST_CONV_OP = backend.HAS_EXTENSION and hasattr(torch.ops.tore_kernels, "image_token_prune_post_conv")

if HAS_POST_CONV_OP:
    @torch.library.register_fake("tore_kernels::image_token_prune_post_conv")
    def _post_conv_fake(conv, x, fw, fb, lw, lb, eps, seq_first):
        return _empty_outputs(x, fw, seq_first)

    def _post_conv_backward(ctx, d_tokens, d_heatmap):
        return _recompute_backward(_post_conv_torch, ctx, d_tokens, d_heatmap)

    torch.library.register_autograd("tore_kernels::image_token_prune_post_conv", _post_conv_backward,
                                    setup_context=_save_for_recompute)


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except Exception:  # backend.register's "triton" requirement keeps this path from being chosen
    triton = None

if triton is not None:
    @triton.jit
    def _mma(a, b, acc, IEEE: tl.constexpr):
        """acc + a @ b with fp32 accumulation; IEEE: exact fp32 products (fp32 inputs, no TF32)."""
        if IEEE:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _itp_logits_kernel(x_ptr, cw_ptr, cb_ptr, fw_ptr, fb_ptr, logits_ptr,
                           C, C4, H, W, N,
                           BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
                           BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
        """logits[b, n, p] = fc_b[n] + sum_co fc_w[n, co] * GELU(conv_b[co] + sum_k conv_w[co, k] * im2col[k, p])
        with k = ci*9 + tap (conv_w's own memory order), for one sample b and one block of positions p."""
        b = tl.program_id(0).to(tl.int64)
        HW = H * W
        K = C * 9
        offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = offs_p < HW
        row = offs_p // W
        col = offs_p % W
        offs_n = tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        x_b = x_ptr + b * C * HW
        logits = tl.zeros([BLOCK_N, BLOCK_P], dtype=tl.float32)
        for co0 in range(0, C4, BLOCK_CO):
            offs_co = co0 + tl.arange(0, BLOCK_CO)
            co_mask = offs_co < C4
            acc = tl.zeros([BLOCK_CO, BLOCK_P], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < K
                ci = offs_k // 9
                tap = offs_k % 9
                r = row[None, :] + (tap // 3 - 1)[:, None]
                c = col[None, :] + (tap % 3 - 1)[:, None]
                inside = (r >= 0) & (r < H) & (c >= 0) & (c < W) & p_mask[None, :] & k_mask[:, None]
                xk = tl.load(x_b + ci[:, None] * HW + r * W + c, mask=inside, other=0.0)
                wk = tl.load(cw_ptr + offs_co[:, None] * K + offs_k[None, :],
                             mask=co_mask[:, None] & k_mask[None, :], other=0.0)
                acc = _mma(wk, xk, acc, IEEE)
            acc += tl.load(cb_ptr + offs_co, mask=co_mask, other=0.0).to(tl.float32)[:, None]
            g = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))  # exact GELU; padded co rows stay 0
            fw = tl.load(fw_ptr + offs_n[:, None] * C4 + offs_co[None, :],
                         mask=n_mask[:, None] & co_mask[None, :], other=0.0)
            logits = _mma(fw, g.to(fw.dtype), logits, IEEE)  # GELU output rounded to the input dtype, as eager
        logits += tl.load(fb_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        out = logits_ptr + b * N * HW + offs_n[:, None] * HW + offs_p[None, :]
        tl.store(out, logits, mask=n_mask[:, None] & p_mask[None, :])

    @triton.jit
    def _token_tile(a, x_b, c0, C, HW, offs_hw, hw_mask, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                    IEEE: tl.constexpr):
        """z = a @ F[c0:c0 + BLOCK_C]^T in fp32 for one sample (both passes of the kernel below compute it)."""
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        ft = tl.load(x_b + offs_c[None, :] * HW + offs_hw[:, None], mask=hw_mask[:, None] & c_mask[None, :], other=0.0)
        return _mma(a, ft, tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32), IEEE), offs_c, c_mask

    @triton.jit
    def _itp_project_norm_kernel(logits_ptr, x_ptr, lw_ptr, lb_ptr, heat_ptr, tok_ptr,
                                 C, HW, N, stride_tb, stride_tn, eps,
                                 BLOCK_N: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
                                 IEEE: tl.constexpr):
        """One sample: heatmap = softmax_HW(logits); z = heatmap @ F^T; tokens = LayerNorm_[N,C](z)."""
        b = tl.program_id(0).to(tl.int64)
        offs_hw = tl.arange(0, BLOCK_HW)
        hw_mask = offs_hw < HW
        x_b = x_ptr + b * C * HW
        tok_b = tok_ptr + b * stride_tb
        mean = tl.zeros([], dtype=tl.float32)
        m2 = tl.zeros([], dtype=tl.float32)
        count = tl.zeros([], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
            mask = n_mask[:, None] & hw_mask[None, :]
            rows = b * N * HW + offs_n[:, None] * HW + offs_hw[None, :]
            lg = tl.load(logits_ptr + rows, mask=mask, other=0.0)
            mx = tl.max(tl.where(hw_mask[None, :], lg, float("-inf")), axis=1)
            e = tl.where(mask, tl.exp(lg - mx[:, None]), 0.0)
            denom = tl.where(n_mask, tl.sum(e, axis=1), 1.0)  # padded rows are all 0: keep them 0, not NaN
            a = e / denom[:, None]
            tl.store(heat_ptr + rows, a.to(heat_ptr.dtype.element_ty), mask=mask)
            a = a.to(x_ptr.dtype.element_ty)
            n_valid = tl.minimum(N - n0, BLOCK_N).to(tl.float32)
            for c0 in range(0, C, BLOCK_C):
                z, offs_c, c_mask = _token_tile(a, x_b, c0, C, HW, offs_hw, hw_mask, BLOCK_N, BLOCK_C, IEEE)
                zmask = n_mask[:, None] & c_mask[None, :]
                cnt = n_valid * tl.minimum(C - c0, BLOCK_C).to(tl.float32)
                t_mean = tl.sum(tl.where(zmask, z, 0.0)) / cnt
                d = tl.where(zmask, z - t_mean, 0.0)
                delta = t_mean - mean
                total = count + cnt
                mean += delta * (cnt / total)
                m2 += tl.sum(d * d) + delta * delta * (count * cnt / total)
                count = total
        rstd = 1.0 / tl.sqrt(m2 / count + eps)
        # Second pass: recompute z from the stored heatmap (the very values the first pass multiplied) rather
        # than round-tripping z through the output dtype: same bytes (F re-read vs z written and read back),
        # and the fp16/bf16 tokens are normalised from fp32 z.
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
            rows = b * N * HW + offs_n[:, None] * HW + offs_hw[None, :]
            a = tl.load(heat_ptr + rows, mask=n_mask[:, None] & hw_mask[None, :], other=0.0)
            a = a.to(x_ptr.dtype.element_ty)
            for c0 in range(0, C, BLOCK_C):
                z, offs_c, c_mask = _token_tile(a, x_b, c0, C, HW, offs_hw, hw_mask, BLOCK_N, BLOCK_C, IEEE)
                zmask = n_mask[:, None] & c_mask[None, :]
                ln = offs_n[:, None] * C + offs_c[None, :]
                w = tl.load(lw_ptr + ln, mask=zmask, other=0.0).to(tl.float32)
                bias = tl.load(lb_ptr + ln, mask=zmask, other=0.0).to(tl.float32)
                tl.store(tok_b + offs_n[:, None] * stride_tn + offs_c[None, :],
                         ((z - mean) * rstd * w + bias).to(tok_ptr.dtype.element_ty), mask=zmask)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# Block sizes per shape class; 8 warps and no software pipelining, except where AOT compiles showed ptxas
# spilling a few bytes on some of sm_80/86/89/90 (there 4 warps compile clean). Pipelining (num_stages > 1)
# of the implicit-GEMM loop spilled at several tile sizes. `gpu_report_configs` lists every class.
_FOUR_WARPS = {("logits", 32, 32, torch.float32), ("logits", 16, 64, torch.float32),
               ("project", 16, torch.float16), ("project", 16, torch.bfloat16)}


def _logits_config(hw: int, n: int, dtype: torch.dtype) -> dict:
    """Kernel 1: the logits accumulator BLOCK_N x BLOCK_P holds <= 4096 fp32 (tl.dot needs every dim >= 16);
    the conv tile is 32 output channels x BLOCK_P with a K step of 32."""
    block_n = max(16, _next_pow2(n))
    block_p = min(64, max(16, _next_pow2(hw)), 4096 // block_n)
    warps = 4 if ("logits", block_n, block_p, dtype) in _FOUR_WARPS else 8
    return dict(BLOCK_CO=32, BLOCK_K=32, BLOCK_P=block_p, BLOCK_N=block_n, num_warps=warps, num_stages=1)


def _project_config(hw: int, dtype: torch.dtype) -> dict:
    """Kernel 2: a heatmap tile of 16 rows x BLOCK_HW, an F tile of BLOCK_HW x BLOCK_C (<= 4096 elements;
    BLOCK_C = 128 at BLOCK_HW = 16 spilled)."""
    block_hw = max(16, _next_pow2(hw))
    warps = 4 if ("project", block_hw, dtype) in _FOUR_WARPS else 8
    return dict(BLOCK_N=16, BLOCK_HW=block_hw, BLOCK_C=max(16, min(64, 2048 // block_hw)), num_warps=warps,
                num_stages=1)


def _ieee_dot(dtype) -> bool:
    # Triton 3.8's interpreter computes tl.dot on bf16 operands wrongly; bf16 -> fp32 is exact and the
    # accumulation is fp32 either way, so under the interpreter bf16 tiles are upcast instead.
    return dtype == torch.float32 or (dtype == torch.bfloat16 and backend.triton_interpret())


def _launchable(kernel):
    """``wrap_triton(kernel)`` (so that torch.compile traces the launch); an interpreted kernel (TRITON_INTERPRET=1)
    as it is: torch 2.11's wrap_triton refuses those (later versions pass them through), and nothing traces them."""
    return kernel if backend.triton_interpret() else wrap_triton(kernel)


def _triton_forward(x, cw, cb, fw, fb, lw, lb, eps, seq_first):
    B, C, H, W = x.shape
    N, HW = fw.shape[0], H * W
    x, cw, cb, fw, fb, lw, lb = (t.contiguous() for t in (x, cw, cb, fw, fb, lw, lb))
    heatmap = torch.empty(B, N, HW, device=x.device, dtype=x.dtype)
    logits = heatmap if x.dtype == torch.float32 else torch.empty(B, N, HW, device=x.device, dtype=torch.float32)
    tokens = torch.empty((N, B, C) if seq_first else (B, N, C), device=x.device, dtype=x.dtype)
    stride_tb, stride_tn = (C, B * C) if seq_first else (N * C, C)
    ieee = _ieee_dot(x.dtype)
    c1 = _logits_config(HW, N, x.dtype)
    grid1 = (B, triton.cdiv(HW, c1["BLOCK_P"]))  # batch on axis 0 (up to 2**31 - 1 programs)
    _launchable(_itp_logits_kernel)[grid1](x, cw, cb, fw, fb, logits, C, C // 4, H, W, N, IEEE=ieee, **c1)
    c2 = _project_config(HW, x.dtype)
    _launchable(_itp_project_norm_kernel)[(B,)](logits, x, lw, lb, heatmap, tokens, C, HW, N, stride_tb,
                                                stride_tn, eps, IEEE=ieee, **c2)
    return tokens, heatmap


if triton is not None:
    @triton_op("tore_kernels::image_token_prune_triton", mutates_args=())
    def _itp_triton(x: torch.Tensor, cw: torch.Tensor, cb: torch.Tensor, fw: torch.Tensor, fb: torch.Tensor,
                    lw: torch.Tensor, lb: torch.Tensor, eps: float, seq_first: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two Triton launches (inputs validated by image_token_prune)."""
        return _triton_forward(x, cw, cb, fw, fb, lw, lb, eps, seq_first)

    @_itp_triton.register_fake
    def _itp_triton_fake(x, cw, cb, fw, fb, lw, lb, eps, seq_first):
        # explicit: under TRITON_INTERPRET=1 the wrapped kernels would otherwise run on fake tensors
        return _empty_outputs(x, fw, seq_first)

    def _itp_backward(ctx, d_tokens, d_heatmap):
        return _recompute_backward(_torch_forward, ctx, d_tokens, d_heatmap)

    _itp_triton.register_autograd(_itp_backward, setup_context=_save_for_recompute)


# ----------------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------------
_WARNED_FALLBACK: set[str] = set()


def image_token_prune(features, conv_weight, conv_bias, fc_weight, fc_bias, ln_weight, ln_bias,
                      eps: float = 1e-5, seq_first: bool = False):
    """TORE's Image Token Pruner. ``features [B, C, H, W]`` (C a multiple of 4), ``conv_weight [C/4, C, 3, 3]``,
    ``conv_bias [C/4]``, ``fc_weight [N, C/4]``, ``fc_bias [N]``, ``ln_weight``/``ln_bias [N, C]``, 1 <= N <= H*W.

    Returns ``(tokens, heatmap)``: tokens ``[B, N, C]`` (``[N, B, C]`` when ``seq_first``, written directly in
    that layout by the Triton kernel), heatmap ``[B, N, H*W]`` (each row a softmax over the H*W positions).
    """
    _check_inputs(features, conv_weight, conv_bias, fc_weight, fc_bias, ln_weight, ln_bias, eps)
    args = (features, conv_weight, conv_bias, fc_weight, fc_bias, ln_weight, ln_bias)
    # an empty batch has nothing to fuse (and would launch zero-size grids): the eager sequence defines it
    impl = "reference" if features.shape[0] == 0 else backend.choose(OP, features.device)
    if impl == "triton":
        H, W = features.shape[2:]
        why = ("float64 is not a Triton dtype" if features.dtype not in _TRITON_DTYPES else
               f"H*W = {H * W} > {MAX_TRITON_HW}" if H * W > MAX_TRITON_HW else None)
        if why is None:
            return _itp_triton(*args, float(eps), bool(seq_first))
        if why not in _WARNED_FALLBACK:
            _WARNED_FALLBACK.add(why)
            warnings.warn(f"image_token_prune: the Triton kernel does not cover this input ({why}); "
                          "using the torch path.", RuntimeWarning, stacklevel=2)
        impl = "cpu"
    if impl == "cpu" and features.device.type == "cpu" and uses_post_conv_op():
        return torch.ops.tore_kernels.image_token_prune_post_conv(
            conv2d(features, conv_weight, conv_bias, padding=1), features, fc_weight, fc_bias, ln_weight, ln_bias,
            float(eps), bool(seq_first))
    tokens, heatmap = (_reference_forward if impl == "reference" else _torch_forward)(*args, eps)
    return (tokens.transpose(0, 1).contiguous() if seq_first else tokens), heatmap


# ----------------------------------------------------------------------------------------------
# ahead-of-time compile report
# ----------------------------------------------------------------------------------------------
_TL_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _analytic_cost(B, C, HW, N, dtype):
    """Per kernel: (FLOPs, global-memory bytes fused, bytes of the eager ops it replaces) for one forward."""
    s = torch.tensor([], dtype=dtype).element_size()
    C4 = C // 4
    x, h, a, z, logits32 = B * C * HW * s, B * C4 * HW * s, B * N * HW * s, B * N * C * s, B * N * HW * 4
    conv_params, fc_params, ln_params = (9 * C * C4 + C4) * s, (N * C4 + N) * s, 2 * N * C * s
    # kernel 1 replaces conv(+bias), GELU, the transpose to [B, HW, C/4] (copied for the linear), the linear
    k1 = (B * (2 * 9 * C * C4 * HW + 2 * C4 * HW * N + 8 * C4 * HW),
          x + conv_params + fc_params + logits32,
          (x + conv_params + h) + 2 * h + 2 * h + (h + fc_params + a))
    # kernel 2 replaces softmax, A @ F, LayerNorm; its second pass re-reads the heatmap and F and redoes A @ F
    k2 = (B * (5 * N * HW + 4 * N * HW * C + 8 * N * C),
          logits32 + 2 * x + ln_params + 2 * a + z,
          2 * a + (a + x + z) + (3 * z + ln_params))
    return k1, k2


def _distinct_configs(config_of):
    """Each distinct config over every supported (H*W, N), with the largest such shape as its example."""
    seen = {}
    for hw in range(1, MAX_TRITON_HW + 1):
        for n in range(1, hw + 1):
            seen[tuple(sorted(config_of(hw, n).items()))] = (hw, n)  # the class's largest: its worst case
    return [(dict(key), hw, n) for key, (hw, n) in seen.items()]


def gpu_report_configs() -> list[KernelConfig]:
    """Every configuration the launcher can pick (kernel 1 per (BLOCK_N, BLOCK_P) class, kernel 2 per BLOCK_HW
    class) for fp32/fp16/bf16. Costs are for C=512, batch 32 at the class's largest (H*W, N)."""
    if triton is None:
        return []
    sig1 = dict(x_ptr="*{t}", cw_ptr="*{t}", cb_ptr="*{t}", fw_ptr="*{t}", fb_ptr="*{t}", logits_ptr="*fp32",
                C="i32", C4="i32", H="i32", W="i32", N="i32")
    sig2 = dict(logits_ptr="*fp32", x_ptr="*{t}", lw_ptr="*{t}", lb_ptr="*{t}", heat_ptr="*{t}", tok_ptr="*{t}",
                C="i32", HW="i32", N="i32", stride_tb="i32", stride_tn="i32", eps="fp32")
    kernels = ((0, "itp_logits", _itp_logits_kernel, sig1, _logits_config),
               (1, "itp_project_norm", _itp_project_norm_kernel, sig2, lambda hw, n, dt: _project_config(hw, dt)))
    configs = []
    for dtype, t in _TL_TYPES.items():
        for which, name, kernel, sig, config_of in kernels:
            for cfg, hw, n in _distinct_configs(lambda hw, n: config_of(hw, n, dtype)):
                consts = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
                flops, fused, eager = _analytic_cost(32, 512, hw, n, dtype)[which]
                blocks = ",".join(f"{k}={v}" for k, v in consts.items())
                configs.append(KernelConfig(
                    name=f"{name}[{blocks},{t}](e.g. C=512,HW={hw},N={n},B=32)", kernel=kernel,
                    signature={**{k: v.format(t=t) for k, v in sig.items()},
                               **{k: "constexpr" for k in consts}, "IEEE": "constexpr"},
                    constexprs={**consts, "IEEE": dtype == torch.float32},
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                    flops=flops, bytes_fused=fused, bytes_eager=eager))
    return configs
