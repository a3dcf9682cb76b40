"""NSR self-attention over the 431 coarse-mesh vertex tokens (dim 128, 8 heads, the adjacency mask):
nn.MultiheadAttention as the model calls it vs tore-kernels' AdjacencyMultiheadAttention, alone and
inside the whole decoder layer. Runs on the generated default body mesh; with TORE_FASTMETRO_DATA set to a
folder of FastMETRO's files, also on SMPL's real adjacency."""
import os

import torch
import torch.nn.functional as F

from tore_kernels.nn.attention import AdjacencyMultiheadAttention
from tore_kernels.topology import default_body_mesh, load_fastmetro
from tore_reference.transformer import TransformerDecoderLayer
from tore_benchmarks.harness import Case, entry

DIM, HEADS, MLP = 128, 8, 512


def _no_grad(fn):
    def call():
        with torch.no_grad():
            return fn()
    return call


def _masks():
    yield "default", default_body_mesh().attention_mask()
    folder = os.environ.get("TORE_FASTMETRO_DATA")
    if folder:
        yield "fastmetro-smpl", load_fastmetro(folder, "smpl").attention_mask()


@entry("nsr_attention")
def nsr_attention(device, quick):
    torch.manual_seed(0)
    eager = torch.nn.MultiheadAttention(DIM, HEADS).to(device).eval()
    fast = AdjacencyMultiheadAttention.from_module(eager)
    fast_skip = AdjacencyMultiheadAttention.from_module(eager, skip_unused_weights=True)
    for name, mask in _masks():
        mask = mask.to(device)
        L = mask.shape[0]
        for batch in ((1, 32) if quick else (1, 16, 32)):
            y = torch.randn(L, batch, DIM, device=device)
            qk = y + torch.zeros_like(y)  # q = k = y + query_pos, v = y: the decoder's call
            sdpa_mask = ~mask
            w, b = eager.in_proj_weight, eager.in_proj_bias

            def sdpa(y=y, qk=qk, sdpa_mask=sdpa_mask, batch=batch):
                q, k = F.linear(qk, w[:2 * DIM], b[:2 * DIM]).unflatten(-1, (2, HEADS, -1)).permute(2, 1, 3, 0, 4)
                v = F.linear(y, w[2 * DIM:], b[2 * DIM:]).unflatten(-1, (HEADS, -1)).permute(1, 2, 0, 3)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask)
                return eager.out_proj(out.permute(2, 0, 1, 3).reshape(L, batch, DIM))

            fast(qk, qk, y, attn_mask=mask)  # the one-time neighbour table is not what is measured
            yield Case("nsr_attention", {"mask": name, "L": L, "batch": batch, "dim": DIM, "heads": HEADS,
                                         "dtype": "fp32"}, {
                "eager as called": _no_grad(lambda qk=qk, y=y, m=mask: eager(qk, qk, y, attn_mask=m)),
                "eager need_weights=False": _no_grad(
                    lambda qk=qk, y=y, m=mask: eager(qk, qk, y, attn_mask=m, need_weights=False)),
                "sdpa bool mask": _no_grad(sdpa),
                "tore-kernels as called": _no_grad(lambda qk=qk, y=y, m=mask: fast(qk, qk, y, attn_mask=m)),
                "tore-kernels skip_unused_weights": _no_grad(
                    lambda qk=qk, y=y, m=mask: fast_skip(qk, qk, y, attn_mask=m)),
            })


@entry("nsr_decoder_layer")
def nsr_decoder_layer(device, quick):
    torch.manual_seed(0)
    eager = TransformerDecoderLayer(DIM, HEADS, MLP).to(device).eval()
    fast = TransformerDecoderLayer(DIM, HEADS, MLP).to(device).eval()
    fast.load_state_dict(eager.state_dict())
    # the layer drops both attentions' weights ([0]), so they are skipped; the cross-attention to the 14 joint
    # features (no mask, all-False key padding as FastMETRO passes it) also runs through the kernel
    fast.self_attn = AdjacencyMultiheadAttention.from_module(eager.self_attn, skip_unused_weights=True)
    fast.multihead_attn = AdjacencyMultiheadAttention.from_module(eager.multihead_attn, skip_unused_weights=True)
    for name, mask in _masks():
        mask = mask.to(device)
        L = mask.shape[0]
        for batch in ((1, 32) if quick else (1, 16, 32)):
            tgt = torch.randn(L, batch, DIM, device=device)
            memory = torch.randn(14, batch, DIM, device=device)  # the 14 joint features of transformer_2
            pos = torch.randn(14, batch, DIM, device=device)
            query_pos = torch.zeros_like(tgt)
            padding = torch.zeros(batch, 14, dtype=torch.bool, device=device)  # the model's memory_key_padding_mask
            fast(tgt, memory, tgt_mask=mask, memory_key_padding_mask=padding, pos=pos, query_pos=query_pos)
            yield Case("nsr_decoder_layer", {"mask": name, "L": L, "batch": batch, "dim": DIM, "heads": HEADS,
                                             "dtype": "fp32"}, {
                "eager": _no_grad(lambda t=tgt, m=memory, p=pos, qp=query_pos, k=mask, kp=padding:
                                  eager(t, m, tgt_mask=k, memory_key_padding_mask=kp, pos=p, query_pos=qp)),
                "tore-kernels attention": _no_grad(lambda t=tgt, m=memory, p=pos, qp=query_pos, k=mask, kp=padding:
                                                   fast(t, m, tgt_mask=k, memory_key_padding_mask=kp, pos=p,
                                                        query_pos=qp)),
            })
