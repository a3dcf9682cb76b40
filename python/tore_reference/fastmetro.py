"""The model after the CNN backbone, mirroring the released code (tore-model.md sections 1-3):

- ``ToreFastMETROHead``: TORE-FastMETRO (``FastMETRO_Body_Network`` of TORE's ``modeling_fm``): optional
  Image Token Pruner, ``transformer_1/2`` decoding 14 joint tokens, and the Neural Shape Regressor
  ``transformer_3`` decoding 431 vertex tokens under the coarse-mesh adjacency mask.
- ``FastMETROHead``: the original FastMETRO (``FastMETRO_Body_Network`` / ``FastMETRO_Hand_Network``):
  ``transformer_1/2`` decode 14 joint + 431 vertex tokens under a ``[445, 445]`` mask.

Both take backbone features ``[B, C_backbone, H, W]``. Parameter names are the released ones, so a
released checkpoint loads strictly once its ``backbone.*`` keys are dropped. The adjacency and the mesh
sampler are passed in: the heads read no files.
"""
import torch
from torch import nn

from .itp import image_token_pruning
from .position_encoding import build_position_encoding
from .transformer import _check_float_tensor, build_transformer, check_attention_mask

NUM_LAYERS = {"S": 1, "M": 2, "L": 3}


def vertex_attention_mask(adjacency):
    """``[V, V]`` bool, True = may NOT attend (the released ``adjacency == 0``).

    ``adjacency``: a float (or int) adjacency, dense or sparse COO, whose zeros are the masked pairs;
    or a bool tensor, taken as the attention mask itself (the released ``attention_mask``)."""
    if not isinstance(adjacency, torch.Tensor):
        raise TypeError(f"adjacency must be a torch.Tensor, got {type(adjacency).__name__}")
    if adjacency.dim() != 2 or adjacency.shape[0] != adjacency.shape[1]:
        raise ValueError(f"adjacency must be a square [V, V] matrix, got {list(adjacency.shape)}")
    if adjacency.is_sparse:
        adjacency = adjacency.to_dense()
    if adjacency.dtype == torch.bool:
        mask = adjacency.clone()
        # SMPL / MANO adjacencies have self-loops, so a released mask has a False diagonal; a True one
        # means a bool *adjacency* was passed where the mask was expected.
        if bool(mask.diagonal().any()):
            raise ValueError("adjacency given as bool is taken as the attention mask (True = may not attend) "
                             "and must have a False diagonal; pass a float adjacency (zeros = no edge) instead")
    else:
        mask = adjacency == 0
    check_attention_mask(mask, mask.shape[0], name="adjacency mask")
    return mask.cpu()


def _check_mesh_sampler(mesh_sampler):
    if not callable(getattr(mesh_sampler, "upsample", None)):
        raise TypeError("mesh_sampler must have an upsample(x, n1, n2) method (e.g. tore_reference.Mesh)")


def _check_sizes(model_size, dims, name, count):
    if model_size not in NUM_LAYERS:
        raise ValueError(f"model_size must be one of {sorted(NUM_LAYERS)}, got {model_size!r}")
    if len(dims) != count or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        raise ValueError(f"{name} must be {count} positive ints, got {dims!r}")


class _FastMETROHeadBase(nn.Module):
    """What both heads share: ``conv_1x1``, two encoder-decoders with 512 -> 128 reduction between
    them, the camera / joint / vertex token embeddings, the positional encodings and ``cam_predictor``."""

    def __init__(self, backbone_channels, model_size, num_joints, num_vertices, model_dims, feedforward_dims,
                 nhead, dropout, vertex_token_dim, mesh_sampler):
        super().__init__()
        if isinstance(backbone_channels, bool) or not isinstance(backbone_channels, int) or backbone_channels < 1:
            raise ValueError(f"backbone_channels must be a positive int, got {backbone_channels!r}")
        for value, name in ((num_joints, "num_joints"), (num_vertices, "num_vertices")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        _check_mesh_sampler(mesh_sampler)
        self.mesh_sampler = mesh_sampler
        self.backbone_channels = backbone_channels
        self.num_joints = num_joints
        self.num_vertices = num_vertices
        self.model_size = model_size
        layers = NUM_LAYERS[model_size]
        dim_1, dim_2 = model_dims[0], model_dims[1]
        self.transformer_config_1 = {"model_dim": dim_1, "dropout": dropout, "nhead": nhead,
                                     "feedforward_dim": feedforward_dims[0], "num_enc_layers": layers,
                                     "num_dec_layers": layers, "pos_type": "sine"}
        self.transformer_config_2 = dict(self.transformer_config_1, model_dim=dim_2,
                                         feedforward_dim=feedforward_dims[1])
        self.transformer_1 = build_transformer(self.transformer_config_1)
        self.transformer_2 = build_transformer(self.transformer_config_2)
        self.dim_reduce_dec = nn.Linear(dim_1, dim_2)
        self.cam_token_embed = nn.Embedding(1, dim_1)
        self.joint_token_embed = nn.Embedding(num_joints, dim_1)
        self.vertex_token_embed = nn.Embedding(num_vertices, vertex_token_dim)
        self.position_encoding_1 = build_position_encoding(hidden_dim=dim_1)
        self.position_encoding_2 = build_position_encoding(hidden_dim=dim_2)
        self.cam_predictor = nn.Linear(dim_2, 3)
        self.conv_1x1 = nn.Conv2d(backbone_channels, dim_1, kernel_size=1)

    def _check_features(self, features):
        _check_float_tensor(features, "features", (None, self.backbone_channels, None, None))
        if features.shape[0] < 1:
            raise ValueError("features must hold at least one sample")

    @staticmethod
    def _per_sample(embedding, batch_size):
        return embedding.weight.unsqueeze(1).repeat(1, batch_size, 1)  # [L, B, E]

    def _two_transformers(self, img_tokens, pos_1, pos_2, queries, attention_mask, reduce_cam, reduce_img):
        """transformer_1 at model_dim_1, reduction, transformer_2 at model_dim_2
        -> (cam_features_2 [1, B, E2], query_features_2 [Q, B, E2])."""
        cam_token = self._per_sample(self.cam_token_embed, img_tokens.shape[1])
        cam_1, enc_img_1, queries_1 = self.transformer_1(img_tokens, cam_token, queries, pos_1,
                                                         attention_mask=attention_mask)
        cam_2, _, queries_2 = self.transformer_2(reduce_img(enc_img_1), reduce_cam(cam_1),
                                                 self.dim_reduce_dec(queries_1), pos_2, attention_mask=attention_mask)
        return cam_2, queries_2


class ToreFastMETROHead(_FastMETROHeadBase):
    """TORE-FastMETRO after the backbone. ``forward(features [B, C, H, W])`` returns, as released,
    ``(cam [B, 3], joints [B, J, 3], vertices coarse [B, V, 3], mid [B, 1723, 3], fine [B, 6890, 3],
    token_heatmap [B, N, H*W])``; without the ITP (``use_itp=False``, GTR only) the heatmap is left out
    and the transformers see all ``H*W`` image tokens with a 2-D ``H x W`` positional encoding.

    N = ``int(H * W * keep_ratio)`` with ``feature_size = (H, W)``; model_size S / M / L = 1 / 2 / 3 layers
    in every encoder and decoder (``transformer_3`` included, as in the released code)."""

    def __init__(self, adjacency, mesh_sampler, backbone_channels=2048, model_size="L", keep_ratio=0.8,
                 use_itp=True, feature_size=(7, 7), num_joints=14, num_vertices=431,
                 model_dims=(512, 128, 128), feedforward_dims=(2048, 512, 512), nhead=8, dropout=0.1):
        _check_sizes(model_size, model_dims, "model_dims", 3)
        _check_sizes(model_size, feedforward_dims, "feedforward_dims", 3)
        # transformer_3 takes transformer_2's joint and camera features as they are: no projection between
        if model_dims[1] != model_dims[2]:
            raise ValueError(f"model_dims[1] and model_dims[2] must be equal (transformer_2 feeds transformer_3), "
                             f"got {model_dims!r}")
        super().__init__(backbone_channels, model_size, num_joints, num_vertices, model_dims, feedforward_dims,
                         nhead, dropout, vertex_token_dim=model_dims[2], mesh_sampler=mesh_sampler)
        self.use_itp = bool(use_itp)
        if self.use_itp:
            if (len(feature_size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1
                                              for s in feature_size)):
                raise ValueError(f"feature_size must be two positive ints (H, W), got {feature_size!r}")
            if not 0 < keep_ratio <= 1:
                raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
            self.feature_size = tuple(feature_size)
            self.keep_num = int(feature_size[0] * feature_size[1] * keep_ratio)
            if self.keep_num < 1:
                raise ValueError(f"keep_ratio {keep_ratio} keeps no token of a {feature_size} feature map")
            dim_1 = model_dims[0]
            self.token_selector_conv2d = nn.Conv2d(dim_1, dim_1 // 4, kernel_size=3, stride=1, padding=1)
            self.token_selector_fc = nn.Linear(dim_1 // 4, self.keep_num)
            self.layer_norm = nn.LayerNorm([self.keep_num, dim_1])
        self.transformer_config_3 = dict(self.transformer_config_1, model_dim=model_dims[2],
                                         feedforward_dim=feedforward_dims[2])
        self.transformer_3 = build_transformer(self.transformer_config_3)
        # the released model reduces the camera and the image features with the same layer
        self.dim_reduce_enc = nn.Linear(model_dims[0], model_dims[1])
        self.position_encoding_3 = build_position_encoding(hidden_dim=model_dims[2])
        self.xyz_regressor_j = nn.Linear(model_dims[1], 3)
        self.xyz_regressor_v = nn.Linear(model_dims[2], 3)
        mask = vertex_attention_mask(adjacency)
        if mask.shape[0] != num_vertices:
            raise ValueError(f"adjacency must be [{num_vertices}, {num_vertices}], got {list(mask.shape)}")
        # a plain attribute in the released model, so not in its state_dict: non-persistent buffer
        self.register_buffer("attention_mask", mask, persistent=False)

    def forward(self, features):
        self._check_features(features)
        batch_size, _, h, w = features.shape
        dtype, device = features.dtype, features.device
        if self.use_itp and (h, w) != self.feature_size:
            raise ValueError(f"features must be [B, {self.backbone_channels}, {self.feature_size[0]}, "
                             f"{self.feature_size[1]}] (the ITP was built for that grid: {self.keep_num} tokens), "
                             f"got {list(features.shape)}")
        img_features = self.conv_1x1(features)
        if self.use_itp:
            tokens, token_heatmap = image_token_pruning(img_features, self.token_selector_conv2d,
                                                        self.token_selector_fc, self.layer_norm)
            img_tokens = tokens.permute(1, 0, 2)  # [N, B, E1]
            grid = (self.keep_num, 1)
        else:
            img_tokens = img_features.flatten(2).permute(2, 0, 1)  # [HW, B, E1]
            grid = (h, w)
        pos_1 = self.position_encoding_1.sequence(batch_size, *grid, device=device, dtype=dtype)
        pos_2 = self.position_encoding_2.sequence(batch_size, *grid, device=device, dtype=dtype)
        j_tokens = self._per_sample(self.joint_token_embed, batch_size)
        cam_features_2, j_features_2 = self._two_transformers(img_tokens, pos_1, pos_2, j_tokens, None,
                                                              self.dim_reduce_enc, self.dim_reduce_enc)
        cam_parameter = self.cam_predictor(cam_features_2).view(batch_size, 3)

        # Neural Shape Regressor: vertex queries over the joint features, masked by the mesh adjacency
        pos_3 = self.position_encoding_3.sequence(batch_size, self.num_joints, device=device, dtype=dtype)
        v_tokens = self._per_sample(self.vertex_token_embed, batch_size)
        _, _, v_features = self.transformer_3(j_features_2, cam_features_2, v_tokens, pos_3,
                                              attention_mask=self.attention_mask)
        pred_3d_joints = self.xyz_regressor_j(j_features_2.transpose(0, 1))
        pred_3d_vertices_coarse = self.xyz_regressor_v(v_features.transpose(0, 1))
        pred_3d_vertices_mid = self.mesh_sampler.upsample(pred_3d_vertices_coarse, n1=2, n2=1)
        pred_3d_vertices_fine = self.mesh_sampler.upsample(pred_3d_vertices_mid, n1=1, n2=0)
        out = (cam_parameter, pred_3d_joints, pred_3d_vertices_coarse, pred_3d_vertices_mid, pred_3d_vertices_fine)
        return out + (token_heatmap,) if self.use_itp else out


class FastMETROHead(_FastMETROHeadBase):
    """The original FastMETRO after the backbone: one decoder over ``J`` joint + ``V`` vertex tokens, the
    ``[J+V, J+V]`` mask open on the joint rows and columns and ``adjacency == 0`` on the vertex block.

    ``intermediate_vertices=1723`` is the released body network: ``coarse2intermediate_upsample``
    (``Linear(V, 1723)``) then the mesh sampler's fixed 1723 -> 6890 matrix; ``None`` is the released hand
    network: the mesh sampler's ``upsample(coarse)`` directly. Returns the released dict
    (``pred_cam``, ``pred_3d_joints``, ``pred_3d_vertices_coarse``, [``pred_3d_vertices_intermediate``],
    ``pred_3d_vertices_fine``)."""

    def __init__(self, adjacency, mesh_sampler, backbone_channels=2048, model_size="L", num_joints=14,
                 num_vertices=431, intermediate_vertices=1723, model_dims=(512, 128), feedforward_dims=(2048, 512),
                 nhead=8, dropout=0.1):
        _check_sizes(model_size, model_dims, "model_dims", 2)
        _check_sizes(model_size, feedforward_dims, "feedforward_dims", 2)
        super().__init__(backbone_channels, model_size, num_joints, num_vertices, model_dims, feedforward_dims,
                         nhead, dropout, vertex_token_dim=model_dims[0], mesh_sampler=mesh_sampler)
        self.dim_reduce_enc_cam = nn.Linear(model_dims[0], model_dims[1])
        self.dim_reduce_enc_img = nn.Linear(model_dims[0], model_dims[1])
        self.xyz_regressor = nn.Linear(model_dims[1], 3)
        if intermediate_vertices is not None:
            if isinstance(intermediate_vertices, bool) or not isinstance(intermediate_vertices, int) \
                    or intermediate_vertices < 1:
                raise ValueError(f"intermediate_vertices must be a positive int or None, got {intermediate_vertices!r}")
            self.coarse2intermediate_upsample = nn.Linear(num_vertices, intermediate_vertices)
        vertex_mask = vertex_attention_mask(adjacency)
        if vertex_mask.shape[0] != num_vertices:
            raise ValueError(f"adjacency must be [{num_vertices}, {num_vertices}], got {list(vertex_mask.shape)}")
        mask = torch.zeros(num_joints + num_vertices, num_joints + num_vertices, dtype=torch.bool)
        mask[num_joints:, num_joints:] = vertex_mask
        self.register_buffer("attention_mask", mask, persistent=False)

    def forward(self, features):
        self._check_features(features)
        batch_size, _, h, w = features.shape
        dtype, device = features.dtype, features.device
        img_tokens = self.conv_1x1(features).flatten(2).permute(2, 0, 1)  # [HW, B, E1]
        pos_1 = self.position_encoding_1.sequence(batch_size, h, w, device=device, dtype=dtype)
        pos_2 = self.position_encoding_2.sequence(batch_size, h, w, device=device, dtype=dtype)
        jv_tokens = torch.cat([self.joint_token_embed.weight, self.vertex_token_embed.weight], dim=0)
        jv_tokens = jv_tokens.unsqueeze(1).repeat(1, batch_size, 1)
        cam_features_2, jv_features_2 = self._two_transformers(img_tokens, pos_1, pos_2, jv_tokens, self.attention_mask,
                                                               self.dim_reduce_enc_cam, self.dim_reduce_enc_img)
        out = {"pred_cam": self.cam_predictor(cam_features_2).view(batch_size, 3)}
        coordinates = self.xyz_regressor(jv_features_2.transpose(0, 1))
        out["pred_3d_joints"] = coordinates[:, :self.num_joints]
        coarse = coordinates[:, self.num_joints:]
        out["pred_3d_vertices_coarse"] = coarse
        if hasattr(self, "coarse2intermediate_upsample"):
            intermediate = self.coarse2intermediate_upsample(coarse.transpose(1, 2)).transpose(1, 2)
            out["pred_3d_vertices_intermediate"] = intermediate
            out["pred_3d_vertices_fine"] = self.mesh_sampler.upsample(intermediate, n1=1, n2=0)
        else:
            out["pred_3d_vertices_fine"] = self.mesh_sampler.upsample(coarse)
        return out
