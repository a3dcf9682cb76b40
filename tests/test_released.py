"""tore_reference.released, eager: the rewrites of the released networks give the released output types and
shapes, and compute what tore_reference's heads compute (the spec) from their backbone's features, given the same
weights. Tiny sizes (tore_reference.released.TINY_*), 56x56 images mapped to 7x7 by the small backbones."""
import pytest
import torch
from torch import nn

from tore_reference import FastMETROHead, ToreFastMETROHead, released
from tore_reference import metro as reference_metro

B = 2


def head_weights(model):
    return {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}


def features(model, images):
    if "efficientnet" in model.args.arch:
        return model.backbone.extract_endpoints(images)["reduction_6"]
    return model.backbone(images)


@pytest.mark.parametrize("keep_ratio, arch", [(0.8, "resnet50"), (0.5, "efficientnet-b0"), (None, "resnet50")])
def test_tore_fastmetro_is_the_reference_head_after_its_backbone(keep_ratio, arch):
    torch.manual_seed(0)
    model = released.nontrivial_norms(released.build_tore_fastmetro(tiny=True, model_name="FastMETRO_S",
                                                                    keep_ratio=keep_ratio, arch=arch)).eval()
    args = model.args
    assert args.conv_1x1_dim == (1280 if arch.startswith("efficientnet") else 64)  # the release edits args
    head = ToreFastMETROHead(released.mesh_topology("smpl").adjacency.to_dense(), model.mesh_sampler,
                             backbone_channels=args.conv_1x1_dim, model_size="S", keep_ratio=keep_ratio or 1.0,
                             use_itp=keep_ratio is not None, model_dims=(64, 32, 32), feedforward_dims=(64, 64, 64),
                             nhead=4).eval()
    head.load_state_dict(head_weights(model))  # strict: the released parameter names
    images = released.example_images(B, tiny=True)
    with torch.no_grad():
        out, ref = model(images), head(features(model, images))
    assert isinstance(out, tuple) and len(out) == (6 if keep_ratio else 5)
    keep = int(49 * keep_ratio) if keep_ratio else None
    shapes = [(B, 3), (B, 14, 3), (B, 431, 3), (B, 1723, 3), (B, 6890, 3)] + ([(B, keep, 49)] if keep else [])
    assert [tuple(o.shape) for o in out] == shapes
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r)
    assert not isinstance(model.attention_mask, nn.Parameter) and "attention_mask" not in model.state_dict()
    assert hasattr(model, "token_selector_conv2d") == (keep_ratio is not None)


def test_efficientnet_style_backbone_interface():
    backbone = released.EfficientNetStyleBackbone(stride=8)
    images = released.example_images(B, tiny=True)
    endpoints = backbone.extract_endpoints(images)
    assert list(endpoints) == [f"reduction_{i}" for i in range(1, 7)]
    assert endpoints["reduction_6"].shape == (B, 1280, 7, 7)
    assert backbone(images).shape == (B, 1000)  # the classifier, which TORE must not use


@pytest.mark.parametrize("hand", [False, True])
def test_fastmetro_is_the_reference_head_after_its_backbone(hand, request):
    if hand:
        request.getfixturevalue("fastmetro_data")  # MANO needs FastMETRO's files
    torch.manual_seed(0)
    model = released.nontrivial_norms(released.build_fastmetro(hand=hand, tiny=True, model_name="FastMETRO-M")).eval()
    joints, vertices = (21, 195) if hand else (14, 431)
    head = FastMETROHead(released.mesh_topology("mano" if hand else "smpl").adjacency.to_dense(), model.mesh_sampler,
                         backbone_channels=64, model_size="M", num_joints=joints, num_vertices=vertices,
                         intermediate_vertices=None if hand else 1723, model_dims=(64, 32), feedforward_dims=(64, 64),
                         nhead=4).eval()
    head.load_state_dict(head_weights(model))
    images = released.example_images(B, tiny=True)
    with torch.no_grad():
        out, ref = model(images), head(model.backbone(images))
    shapes = {"pred_cam": (B, 3), "pred_3d_joints": (B, joints, 3), "pred_3d_vertices_coarse": (B, vertices, 3)}
    shapes.update({"pred_3d_vertices_fine": (B, 778, 3)} if hand else
                  {"pred_3d_vertices_intermediate": (B, 1723, 3), "pred_3d_vertices_fine": (B, 6890, 3)})
    assert isinstance(out, dict) and {k: tuple(v.shape) for k, v in out.items()} == shapes
    assert out.keys() == ref.keys()
    for key in out:
        torch.testing.assert_close(out[key], ref[key], msg=lambda m: f"{key}: {m}")
    assert hasattr(model, "coarse2intermediate_upsample") != hand


def test_bert_layer_is_the_reference_bert_layer():
    # METRO's BERT layer (tuple in, tuple out, additive mask) computes tore_reference.metro's layer
    config = released.BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64)
    layer = released.nontrivial_norms(released.BertLayer(config)).eval()
    ref = reference_metro.BertLayer(32, 4, 64, dropout=0.1).eval()
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(B, 14, 32)
    with torch.no_grad():
        out = layer(x, torch.zeros(B, 1, 1, 14))
        assert isinstance(out, tuple) and len(out) == 1
        torch.testing.assert_close(out[0], ref(x))
        layer.attention.self.output_attentions = True
        context, probs = layer(x, torch.zeros(B, 1, 1, 14))
    assert probs.shape == (B, 4, 14, 14)
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, 4, 14))


def test_trans_encoder_stages_as_the_run_scripts_build_them():
    args = released.metro_args(**released.TINY_METRO)
    config, trans_encoder = released.build_trans_encoder(args, released.BertConfig(intermediate_size=64, vocab_size=8))
    assert isinstance(trans_encoder, nn.Sequential) and len(trans_encoder) == 3
    assert config is trans_encoder[-1].config and config.output_attentions and config.output_hidden_states
    assert [s.config.output_feature_dim for s in trans_encoder] == [48, 32, 3]
    assert not trans_encoder[0].config.output_attentions
    x = torch.randn(B, 14, 2051)
    with torch.no_grad():
        out, hidden_states, attentions = trans_encoder.eval()(x)
    assert out.shape == (B, 14, 3)
    assert len(hidden_states) == args.num_hidden_layers + 1 and hidden_states[-1].shape == (B, 14, 32)
    assert len(attentions) == args.num_hidden_layers and attentions[0].shape == (B, 4, 14, 14)
    # legacy setting: bert-base's intermediate size in every stage, else 4 x hidden
    _, wide = released.build_trans_encoder(released.metro_args(**dict(released.TINY_METRO, legacy_setting=False)))
    assert [s.bert.encoder.layer[0].intermediate.dense.out_features for s in wide] == [192, 128, 128]
    assert trans_encoder[0].bert.encoder.layer[0].intermediate.dense.out_features == 64


def test_tore_metro_whole_forward_and_its_parts():
    torch.manual_seed(0)
    model = released.build_metro(tore=True, tiny=True).eval()
    assert not hasattr(model, "mesh_sampler") and not hasattr(model, "attention_mask")
    assert model.attention_mask_3.shape == (431, 431) and model.attention_mask_3.dtype == torch.bool
    assert (model.upsampling.in_features, model.upsampling.out_features) == (431, 1723)
    assert (model.upsampling2.in_features, model.upsampling2.out_features) == (1723, 6890)
    images, smpl, sampler = released.example_images(B, tiny=True), released.TemplateSMPL(), released.mesh_sampler()
    with torch.no_grad():
        out = model(images, smpl, sampler)
        assert [tuple(o.shape) for o in out] == [(B, 3), (B, 14, 3), (B, 431, 3), (B, 1723, 3), (B, 6890, 3)]
        # the parts compose to the whole: trans_encoder's last hidden states feed transformer_3
        template = smpl.get_h36m_joints(smpl(torch.zeros(1, 72), torch.zeros(1, 10)))
        ref_joints = (template[:, list(released.H36M_J17_TO_J14)] - template[:, :1]).expand(B, -1, -1)
        tokens = model.conv_learn_tokens(model.backbone(images).flatten(2).transpose(1, 2))
        joints, hidden_states, _ = model.trans_encoder(torch.cat([ref_joints, tokens], dim=2))
        torch.testing.assert_close(joints, out[1])
        pos = model.position_encoding_3(B, 14, 1, images.device).flatten(2).permute(2, 0, 1)
        cam, _, v = model.transformer_3(hidden_states[-1].transpose(0, 1), model.cam_token_embed.weight[:, None].repeat(1, B, 1),
                                        model.vertex_token_embed.weight[:, None].repeat(1, B, 1), pos,
                                        attention_mask=model.attention_mask_3)
        coarse = model.xyz_regressor_v(v.transpose(0, 1))
        torch.testing.assert_close(coarse, out[2])
        torch.testing.assert_close(model.upsampling2(model.upsampling(coarse.transpose(1, 2))).transpose(1, 2), out[4])
        torch.testing.assert_close(model.cam_predictor(cam).view(B, 3), out[0])


def test_metro_whole_forward():
    torch.manual_seed(0)
    model = released.build_metro(tore=False, tiny=True).eval()
    smpl, sampler = released.TemplateSMPL(), released.mesh_sampler()
    with torch.no_grad():
        out = model(released.example_images(B, tiny=True), smpl, sampler)
        assert len(out) == 7  # with the last stage's hidden states and attentions, as the run scripts set
        assert [tuple(o.shape) for o in out[:5]] == [(B, 3), (B, 14, 3), (B, 431, 3), (B, 1723, 3), (B, 6890, 3)]
        assert out[5][-1].shape == (B, 445, 32) and out[6][0].shape == (B, 4, 445, 445)  # dense over 445 tokens
        one = model(released.example_images(1, tiny=True), smpl, sampler)
    assert one[0].shape == (3,)  # the released squeeze()
    # masked vertex / joint modelling in training: masked tokens are replaced by 0.01
    masks = torch.ones(B, 445, 1)
    with torch.no_grad():
        same = model(released.example_images(B, tiny=True), smpl, sampler, meta_masks=masks, is_train=True)
    torch.testing.assert_close(same[1], out[1])


def test_released_mesh_sampler_levels():
    sampler = released.mesh_sampler()
    x = torch.randn(B, 6890, 3)
    assert sampler.downsample(x).shape == (B, 1723, 3)  # one level by default, as released
    assert sampler.downsample(sampler.downsample(x), n1=1, n2=2).shape == (B, 431, 3)
    coarse = torch.randn(B, 431, 3)
    mid = sampler.upsample(coarse, n1=2, n2=1)
    torch.testing.assert_close(mid[1], torch.spmm(sampler._U[1], coarse[1]))
    assert sampler.upsample(mid).shape == (B, 6890, 3)


def test_bad_model_name_is_named():
    with pytest.raises(ValueError, match="args.model_name"):
        released.build_tore_fastmetro(tiny=True, model_name="FastMETRO-L")  # FastMETRO's spelling, not TORE's
    with pytest.raises(ValueError, match="args.model_name"):
        released.build_fastmetro(tiny=True, model_name="FastMETRO_L")
