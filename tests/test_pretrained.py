"""Pretrained weights from where researchers get them: Hugging Face's MiT encoders
(nvidia/mit-b0 .. b5) and SegFormers (nvidia/segformer-b*-finetuned-*), as save_pretrained writes
them, in both file forms and as a folder, against Hugging Face's own forward pass; and the
official NVlabs layout (mit_b0.pth ..) beside them."""

import pytest
import torch
import torch.nn as nn

import heads
import mit

transformers = pytest.importorskip('transformers', minversion='5')  # an optional package; CI installs it


def hf_config(backbone, **kw):
    cfg = mit.get_config(backbone)
    return transformers.SegformerConfig(
        hidden_sizes=list(cfg.embed_dims), depths=list(cfg.depths), num_attention_heads=list(cfg.num_heads),
        sr_ratios=list(cfg.sr_ratios), mlp_ratios=[cfg.mlp_ratio] * 4, decoder_hidden_size=cfg.decoder_dim,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0,
        drop_path_rate=0.0, **kw)


def randomised(module):
    """Every parameter and BatchNorm statistic away from its initial value, so that a tensor
    loaded into the wrong place shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * (0.02 if p.ndim > 1 else 0.1) + (1.0 if 'norm' in name and name.endswith('weight') else 0))
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return module


def same_eps(theirs, ours):
    """Hugging Face's SegFormer has LayerNorm eps 1e-5 everywhere, the official model 1e-6 in the
    blocks and stage norms: a property of their code, not of the weights, so theirs takes ours."""
    theirs_norms = [m for m in theirs.modules() if isinstance(m, nn.LayerNorm)]
    ours_norms = [m for m in ours.modules() if isinstance(m, nn.LayerNorm)]
    assert len(theirs_norms) == len(ours_norms)
    # both list them in the same order: per stage, the patch embedding's, then per block norm1,
    # the attention's reduction norm (where there is one), norm2, then the stage norm
    for a, b in zip(theirs_norms, ours_norms):
        a.eps = b.eps


@pytest.mark.parametrize('form', ['folder', 'safetensors', 'bin'])
def test_a_hugging_face_mit_loads_and_gives_their_features(tmp_path, form):
    theirs = randomised(transformers.SegformerModel(hf_config('b0'))).eval()
    theirs.save_pretrained(tmp_path / 'mit-b0')  # transformers 5 writes model.safetensors
    if form == 'bin':  # the hub's older files: the same names in PyTorch's format, pytorch_model.bin
        weights = tmp_path / 'mit-b0' / 'model.safetensors'
        torch.save(pytest.importorskip('safetensors.torch').load_file(weights), tmp_path / 'mit-b0' / 'pytorch_model.bin')
        weights.unlink()
    path = {'folder': tmp_path / 'mit-b0', 'safetensors': tmp_path / 'mit-b0' / 'model.safetensors',
            'bin': tmp_path / 'mit-b0' / 'pytorch_model.bin'}[form]
    ours = mit.MixVisionTransformer('b0', drop_path_rate=0.0).eval()
    mit.load_pretrained(ours, path)
    same_eps(theirs, ours)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        hidden = theirs(pixel_values=x, output_hidden_states=True).hidden_states
        for got, want in zip(ours(x), hidden):
            # fp32: the same arithmetic in another order (kv as one matmul, views for reshapes)
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()


def test_the_backbone_size_is_checked_in_one_line(tmp_path):
    transformers.SegformerModel(hf_config('b1')).save_pretrained(tmp_path / 'mit-b1')
    with pytest.raises(ValueError, match=r'mit-b1.* holds a MiT-b1 encoder.*the model.s encoder is MiT-b0'):
        mit.load_pretrained(mit.MixVisionTransformer('b0'), tmp_path / 'mit-b1')


def test_the_official_layout_still_loads(tmp_path):
    official = randomised(mit.MixVisionTransformer('b0'))
    torch.save({**official.state_dict(), 'head.weight': torch.zeros(1000, 256), 'head.bias': torch.zeros(1000)},
               tmp_path / 'mit_b0.pth')
    ours = mit.MixVisionTransformer('b0')
    mit.load_pretrained(ours, tmp_path / 'mit_b0.pth')
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), official.state_dict().values()))


@pytest.mark.parametrize('name', ['segformer', 'segdepthformer'])
def test_a_hugging_face_segformer_starts_a_segformer_or_a_segdepthformer(tmp_path, name):
    theirs = randomised(transformers.SegformerForSemanticSegmentation(hf_config('b0', num_labels=7))).eval()
    theirs.save_pretrained(tmp_path / 'segformer-b0')
    ours = heads.build_model(name, 'b0', 7, drop_path_rate=0.0).eval()
    heads.load_segformer_checkpoint(ours, tmp_path / 'segformer-b0')
    same_eps(theirs.segformer, ours.backbone)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        want = theirs(pixel_values=x).logits  # (B, K, H/4, W/4)
        got = ours(x, full=False)['seg']
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()


def test_a_segformer_of_other_classes_gives_its_encoder_only(tmp_path, capsys):
    transformers.SegformerForSemanticSegmentation(hf_config('b0', num_labels=19)).save_pretrained(tmp_path / 'cityscapes')
    ours = heads.build_model('segdepthformer', 'b0', 40)
    head_before = {k: v.clone() for k, v in ours.decode_head.state_dict().items()}
    heads.load_segformer_checkpoint(ours, tmp_path / 'cityscapes')
    assert all(torch.equal(head_before[k], v) for k, v in ours.decode_head.state_dict().items())
    assert '19 classes' in capsys.readouterr().out


def test_train_py_starts_from_a_hugging_face_folder(tmp_path):
    import train
    theirs = randomised(transformers.SegformerModel(hf_config('b0')))
    theirs.save_pretrained(tmp_path / 'mit-b0')
    train.main(['--data', 'synthetic', '--backbone', 'b0', '--synthetic-train', '4', '--synthetic-val', '2',
                '--synthetic-size', '64', '64', '--batch-size', '4', '--epochs', '1', '--workers', '0', '--lr', '1e-30',
                '--pretrained', str(tmp_path / 'mit-b0'), '--out', str(tmp_path / 'run')])
    # lr 1e-30: Adam's step moves a weight by about the lr (AdamW's decay is scaled by it too), so
    # the encoder still holds the file's weights to within 1e-25
    encoder = mit.MixVisionTransformer('b0')
    mit.load_pretrained(encoder, tmp_path / 'mit-b0')
    saved = torch.load(tmp_path / 'run' / 'best.pt', weights_only=True)['model']
    assert all(torch.allclose(saved[f'backbone.{k}'], v, rtol=0, atol=1e-25) for k, v in encoder.state_dict().items())


def test_a_depth_model_takes_a_segformers_encoder_only(tmp_path, capsys):
    transformers.SegformerForSemanticSegmentation(hf_config('b0', num_labels=7)).save_pretrained(tmp_path / 'ade')
    ours = heads.build_model('depthformer', 'b0')
    heads.load_segformer_checkpoint(ours, tmp_path / 'ade')
    assert 'has no single segmentation head; the encoder is loaded' in capsys.readouterr().out
