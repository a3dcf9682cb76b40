"""TORE-METRO after the backbone (tore-model.md section 3): a compact METRO-style BERT encoder over the joint
tokens, then the Neural Shape Regressor ``transformer_3`` decoding the vertex tokens under the mesh mask.

The encoder is a stand-in for METRO's ``trans_encoder`` (an ``nn.Sequential`` of BERT stages with progressive
dimension reduction): each stage embeds ``[template xyz ; global image feature]`` tokens with ``img_embedding``
plus learned ``position_embeddings``, runs post-norm BERT layers
(``encoder.layer[i].attention.self.{query,key,value}``, ``attention.output.{dense,LayerNorm}``,
``intermediate.dense``, ``output.{dense,LayerNorm}``, GELU) and maps to the next width with
``cls_head(x) + residual(input)``. With Geometry Token Reduction only the ``J`` joint tokens go through it;
the NSR part (``transformer_3``, ``vertex_token_embed``, ``position_encoding_3``, ``attention_mask``,
``xyz_regressor_v``, ``mesh_sampler``) is the one of ``ToreFastMETROHead``.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .fastmetro import NUM_LAYERS, _check_mesh_sampler, vertex_attention_mask
from .position_encoding import build_position_encoding
from .transformer import _check_float_tensor, build_transformer


class BertSelfAttention(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.num_attention_heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def forward(self, x):  # [B, L, E], every token sees every token
        heads = [t(x).unflatten(-1, (self.num_attention_heads, -1)).transpose(1, 2)
                 for t in (self.query, self.key, self.value)]
        q, k, v = heads
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        return (probs @ v).transpose(1, 2).flatten(2)


class _DenseNorm(nn.Module):
    """BERT's ``LayerNorm(x + dropout(dense(h)))``; ``dense`` maps ``width_in`` -> ``width``."""

    def __init__(self, width_in, width, dropout):
        super().__init__()
        self.dense = nn.Linear(width_in, width)
        self.LayerNorm = nn.LayerNorm(width, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h, x):
        return self.LayerNorm(x + self.dropout(self.dense(h)))


class BertAttention(nn.Module):
    def __init__(self, hidden, heads, dropout):
        super().__init__()
        self.self = BertSelfAttention(hidden, heads)
        self.output = _DenseNorm(hidden, hidden, dropout)

    def forward(self, x):
        return self.output(self.self(x), x)


class BertIntermediate(nn.Module):
    def __init__(self, hidden, intermediate):
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)

    def forward(self, x):
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, hidden, heads, intermediate, dropout):
        super().__init__()
        self.attention = BertAttention(hidden, heads, dropout)
        self.intermediate = BertIntermediate(hidden, intermediate)
        self.output = _DenseNorm(intermediate, hidden, dropout)

    def forward(self, x):
        x = self.attention(x)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, num_layers, hidden, heads, intermediate, dropout):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(hidden, heads, intermediate, dropout) for _ in range(num_layers)])

    def forward(self, x):
        for layer in self.layer:
            x = layer(x)
        return x


class METROBert(nn.Module):
    """METRO's BERT body: ``img_embedding(tokens) + position_embeddings`` then the encoder layers."""

    def __init__(self, in_dim, hidden, num_tokens, num_layers, heads, intermediate, dropout):
        super().__init__()
        self.img_embedding = nn.Linear(in_dim, hidden)
        self.position_embeddings = nn.Embedding(num_tokens, hidden)
        self.dropout = nn.Dropout(dropout)
        self.encoder = BertEncoder(num_layers, hidden, heads, intermediate, dropout)

    def forward(self, tokens):  # [B, L, in_dim] -> [B, L, hidden]
        return self.encoder(self.dropout(self.img_embedding(tokens) + self.position_embeddings.weight))


class METROStage(nn.Module):
    """One stage of ``trans_encoder``: ``cls_head(bert(x)) + residual(x)``, ``in_dim`` -> ``out_dim``."""

    def __init__(self, in_dim, hidden, out_dim, num_tokens, num_layers, heads, dropout):
        super().__init__()
        self.bert = METROBert(in_dim, hidden, num_tokens, num_layers, heads, 4 * hidden, dropout)
        self.cls_head = nn.Linear(hidden, out_dim)
        self.residual = nn.Linear(in_dim, out_dim)

    def forward(self, x):
        return self.cls_head(self.bert(x)) + self.residual(x)


class ToreMETROHead(nn.Module):
    """TORE-METRO after the backbone. ``forward(features [B, C, H, W])`` (globally average-pooled, as METRO's
    backbone ends) returns ``(cam [B, 3], joints [B, J, 3], vertices coarse [B, V, 3], mid [B, 1723, 3],
    fine [B, 6890, 3])``, the order of ``ToreFastMETROHead`` without ITP.

    ``trans_encoder`` runs over ``J`` tokens ``[template_joints ; image feature]`` through stages of widths
    ``encoder_hidden`` (hidden) / ``encoder_out`` (outputs, the last one = ``model_dim``). The NSR
    ``transformer_3`` (``model_size`` S / M / L = 1 / 2 / 3 layers) takes those joint features as its image
    tokens and a learned camera token (``cam_token_embed``) whose encoder output feeds ``cam_predictor``."""

    def __init__(self, adjacency, mesh_sampler, backbone_channels=2048, model_size="L", num_joints=14,
                 num_vertices=431, template_joints=None, encoder_hidden=(1024, 256), encoder_out=(512, 128),
                 encoder_layers=2, encoder_heads=4, model_dim=128, feedforward_dim=512, nhead=8, dropout=0.1):
        super().__init__()
        if model_size not in NUM_LAYERS:
            raise ValueError(f"model_size must be one of {sorted(NUM_LAYERS)}, got {model_size!r}")
        for value, name in ((backbone_channels, "backbone_channels"), (num_joints, "num_joints"),
                            (num_vertices, "num_vertices"), (encoder_layers, "encoder_layers")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if len(encoder_hidden) != len(encoder_out) or not encoder_out or encoder_out[-1] != model_dim:
            raise ValueError(f"encoder_hidden and encoder_out must have the same length >= 1 and encoder_out must "
                             f"end with model_dim ({model_dim}), got {encoder_hidden!r}, {encoder_out!r}")
        _check_mesh_sampler(mesh_sampler)
        self.mesh_sampler = mesh_sampler
        self.backbone_channels, self.num_joints, self.num_vertices = backbone_channels, num_joints, num_vertices
        if template_joints is None:
            template_joints = torch.zeros(num_joints, 3)
        _check_float_tensor(template_joints, "template_joints", (num_joints, 3))
        # METRO computes its template from the SMPL mesh on every call: not a parameter, not in the state_dict
        self.register_buffer("template_joints", template_joints.detach().clone().float(), persistent=False)
        widths = (backbone_channels + 3,) + tuple(encoder_out)
        self.trans_encoder = nn.Sequential(*[
            METROStage(widths[i], hidden, widths[i + 1], num_joints, encoder_layers, encoder_heads, dropout)
            for i, hidden in enumerate(encoder_hidden)])
        layers = NUM_LAYERS[model_size]
        self.transformer_config_3 = {"model_dim": model_dim, "dropout": dropout, "nhead": nhead,
                                     "feedforward_dim": feedforward_dim, "num_enc_layers": layers,
                                     "num_dec_layers": layers, "pos_type": "sine"}
        self.transformer_3 = build_transformer(self.transformer_config_3)
        self.cam_token_embed = nn.Embedding(1, model_dim)
        self.vertex_token_embed = nn.Embedding(num_vertices, model_dim)
        self.position_encoding_3 = build_position_encoding(hidden_dim=model_dim)
        self.cam_predictor = nn.Linear(model_dim, 3)
        self.xyz_regressor_j = nn.Linear(model_dim, 3)
        self.xyz_regressor_v = nn.Linear(model_dim, 3)
        mask = vertex_attention_mask(adjacency)
        if mask.shape[0] != num_vertices:
            raise ValueError(f"adjacency must be [{num_vertices}, {num_vertices}], got {list(mask.shape)}")
        self.register_buffer("attention_mask", mask, persistent=False)

    def forward(self, features):
        _check_float_tensor(features, "features", (None, self.backbone_channels, None, None))
        if features.shape[0] < 1:
            raise ValueError("features must hold at least one sample")
        batch_size = features.shape[0]
        dtype, device = features.dtype, features.device
        image = features.mean(dim=(2, 3))  # [B, C]
        tokens = torch.cat([self.template_joints.to(dtype).expand(batch_size, -1, -1),
                            image[:, None, :].expand(-1, self.num_joints, -1)], dim=2)  # [B, J, 3 + C]
        j_features = self.trans_encoder(tokens).transpose(0, 1)  # [J, B, E]

        # Neural Shape Regressor: vertex queries over the joint features, masked by the mesh adjacency
        pos_3 = self.position_encoding_3.sequence(batch_size, self.num_joints, device=device, dtype=dtype)
        cam_token = self.cam_token_embed.weight.unsqueeze(1).repeat(1, batch_size, 1)
        v_tokens = self.vertex_token_embed.weight.unsqueeze(1).repeat(1, batch_size, 1)
        cam_features, _, v_features = self.transformer_3(j_features, cam_token, v_tokens, pos_3,
                                                         attention_mask=self.attention_mask)
        cam_parameter = self.cam_predictor(cam_features).view(batch_size, 3)
        pred_3d_joints = self.xyz_regressor_j(j_features.transpose(0, 1))
        pred_3d_vertices_coarse = self.xyz_regressor_v(v_features.transpose(0, 1))
        pred_3d_vertices_mid = self.mesh_sampler.upsample(pred_3d_vertices_coarse, n1=2, n2=1)
        pred_3d_vertices_fine = self.mesh_sampler.upsample(pred_3d_vertices_mid, n1=1, n2=0)
        return cam_parameter, pred_3d_joints, pred_3d_vertices_coarse, pred_3d_vertices_mid, pred_3d_vertices_fine
