"""tore_reference: an independent, readable eager PyTorch implementation of what TORE computes
(docs: tore-model.md). It is the spec every tore_kernels op is tested against and the "eager" side
of every benchmark. Attribute names follow the released TORE / FastMETRO code so its state_dicts load."""
from .itp import ImageTokenPruner, image_token_pruning
from .mesh import Mesh
from .projection import itp_loss, orthographic_projection, token_occupancy
from .position_encoding import PositionEmbeddingSine, build_position_encoding
from .transformer import (Transformer, TransformerDecoder, TransformerDecoderLayer, TransformerEncoder,
                          TransformerEncoderLayer, build_transformer)
from .fastmetro import FastMETROHead, ToreFastMETROHead, vertex_attention_mask
from .metro import ToreMETROHead
from . import released
