"""NSR self-attention over the 431 coarse-mesh vertex tokens (dim 128, 8 heads, the adjacency mask):
nn.MultiheadAttention as the model calls it vs tore-kernels' AdjacencyMultiheadAttention, alone and
inside the whole decoder layer; and the attention alone on q, k, v (``nsr_attention_core``): the neighbour-list
kernel vs dense SDPA with the mask and, on CUDA, FlexAttention with a block mask. Runs on the generated default
body mesh; with TORE_FASTMETRO_DATA set to a folder of FastMETRO's files (your own, trusted: its .npz is
unpickled), also on SMPL's real adjacency."""
import os

import torch
import torch.nn.functional as F

from tore_kernels.nn.attention import AdjacencyMultiheadAttention
from tore_kernels.ops.adjacency_attention import adjacency_attention, neighbour_table
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
        # the folder is the user's own (trusted): its mesh_downsampling.npz needs pickle, refused otherwise
        yield "fastmetro-smpl", load_fastmetro(folder, "smpl", trust_pickle=True).attention_mask()


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


def _flex_attention(allowed):
    """FlexAttention with a block mask of ``allowed`` [L, L] (True = may attend), compiled as its docs ask; None
    on CPU (its CPU path is compiled per shape too, slow to build and not what the comparison is about)."""
    if allowed.device.type != "cuda":
        return None
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed[q_idx, kv_idx]

    L = allowed.shape[0]
    block_mask = create_block_mask(mask_mod, None, None, L, L, device=allowed.device)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


@entry("nsr_attention_core")
def nsr_attention_core(device, quick):
    """softmax(q k^T / sqrt(d) + mask) v on q, k, v [B, 8, L, 16] (the projections are not timed), fp32 (and bf16
    on CUDA). bytes: q, k, v read once and the output written once (the neighbour table, a few KB, left out)."""
    dtypes = (torch.float32, torch.bfloat16) if torch.device(device).type == "cuda" else (torch.float32,)
    name, mask = list(_masks())[-1]  # SMPL's real adjacency where given, else the default mesh's
    mask = mask.to(device)
    L = mask.shape[0]
    table = neighbour_table(mask)
    allowed = ~mask
    flex = _flex_attention(allowed)
    for dtype in dtypes:
        for batch in (1, 32):  # FlexAttention compiles per shape (~15 s on a GPU): the two batches that matter
            g = torch.Generator().manual_seed(batch)
            q, k, v = torch.randn(3, batch, HEADS, L, DIM // HEADS, generator=g).to(device, dtype).unbind(0)
            variants = {
                "sdpa bool mask": _no_grad(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(
                    q, k, v, attn_mask=allowed)),
                "tore-kernels": _no_grad(lambda q=q, k=k, v=v: adjacency_attention(q, k, v, table)),
            }
            if flex is not None:
                variants["flex_attention block mask"] = _no_grad(lambda q=q, k=k, v=v: flex(q, k, v))
            yield Case("nsr_attention_core", {"mask": name, "L": L, "batch": batch, "heads": HEADS,
                                              "head_dim": DIM // HEADS, "dtype": str(dtype).removeprefix("torch.")},
                       variants, bytes=4 * q.numel() * q.element_size())


@entry("dense_attention")
def dense_attention_few_keys(device, quick):
    """Unmasked attention to few keys as the patched FastMETRO layers run it (q, k, v seq-first views of the
    in-projection, [L, B, H, d] in memory; the projections are not timed): SDPA against ``dense_attention``
    (the few-keys kernel on AVX-512 CPUs, SDPA elsewhere). Shapes: the decoder's cross-attention to the 49 image
    tokens (445 queries), the encoders' 50-token self-attention, the NSR's 431 vertices to 14 joints."""
    from tore_kernels.ops.adjacency_attention import dense_attention
    for L, S, d in ((445, 49, 64), (445, 49, 16), (50, 50, 64), (431, 14, 16)):
        for batch in (1, 32):
            g = torch.Generator().manual_seed(batch)
            q = torch.randn(L, batch, 3, HEADS, d, generator=g).to(device)[:, :, 0].permute(1, 2, 0, 3)
            k, v = (torch.randn(S, batch, HEADS, d, generator=g).to(device).permute(1, 2, 0, 3) for _ in range(2))
            yield Case("dense_attention", {"L": L, "S": S, "batch": batch, "heads": HEADS, "head_dim": d},
                       {"sdpa": _no_grad(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)),
                        "tore-kernels": _no_grad(lambda q=q, k=k, v=v: dense_attention(q, k, v))},
                       bytes=4 * (2 * q.numel() + 2 * k.numel()))
