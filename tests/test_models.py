"""Model core: the MiT encoder, the all-MLP decoders and the four models (mit.py, heads.py)."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import heads
import mit
import uq
from heads import build_model

# The official architecture, written out independently of mit.py: per stage
# (channels, heads, depth, spatial reduction), patch kernel, and the decoder width.
OFFICIAL = {
    'b0': dict(dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), E=256),
    'b1': dict(dims=(64, 128, 320, 512), depths=(2, 2, 2, 2), E=256),
    'b2': dict(dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), E=768),
    'b3': dict(dims=(64, 128, 320, 512), depths=(3, 4, 18, 3), E=768),
    'b4': dict(dims=(64, 128, 320, 512), depths=(3, 8, 27, 3), E=768),
    'b5': dict(dims=(64, 128, 320, 512), depths=(3, 6, 40, 3), E=768),
}
SR = (8, 4, 2, 1)


def official_mit_state(backbone, num_classes=1000):
    """Random tensors under every key, with every shape, of an official mit_bX.pth."""
    dims, depths = OFFICIAL[backbone]['dims'], OFFICIAL[backbone]['depths']
    shapes, c_in = {}, 3
    for s, (c, depth) in enumerate(zip(dims, depths), start=1):
        k = 7 if s == 1 else 3
        shapes[f'patch_embed{s}.proj.weight'] = (c, c_in, k, k)
        shapes[f'patch_embed{s}.proj.bias'] = (c,)
        shapes[f'patch_embed{s}.norm.weight'] = shapes[f'patch_embed{s}.norm.bias'] = (c,)
        for j in range(depth):
            p = f'block{s}.{j}.'
            for n in ('norm1', 'norm2'):
                shapes[p + n + '.weight'] = shapes[p + n + '.bias'] = (c,)
            shapes[p + 'attn.q.weight'], shapes[p + 'attn.q.bias'] = (c, c), (c,)
            shapes[p + 'attn.kv.weight'], shapes[p + 'attn.kv.bias'] = (2 * c, c), (2 * c,)
            shapes[p + 'attn.proj.weight'], shapes[p + 'attn.proj.bias'] = (c, c), (c,)
            if SR[s - 1] > 1:
                shapes[p + 'attn.sr.weight'], shapes[p + 'attn.sr.bias'] = (c, c, SR[s - 1], SR[s - 1]), (c,)
                shapes[p + 'attn.norm.weight'] = shapes[p + 'attn.norm.bias'] = (c,)
            shapes[p + 'mlp.fc1.weight'], shapes[p + 'mlp.fc1.bias'] = (4 * c, c), (4 * c,)
            shapes[p + 'mlp.dwconv.dwconv.weight'], shapes[p + 'mlp.dwconv.dwconv.bias'] = (4 * c, 1, 3, 3), (4 * c,)
            shapes[p + 'mlp.fc2.weight'], shapes[p + 'mlp.fc2.bias'] = (c, 4 * c), (c,)
        shapes[f'norm{s}.weight'] = shapes[f'norm{s}.bias'] = (c,)
        c_in = c
    shapes['head.weight'], shapes['head.bias'] = (num_classes, dims[-1]), (num_classes,)
    return {k: torch.randn(v) for k, v in shapes.items()}


def official_segformer_state(backbone, num_classes):
    """An mmsegmentation SegFormer checkpoint: backbone.* and decode_head.* (with conv_seg)."""
    dims, E = OFFICIAL[backbone]['dims'], OFFICIAL[backbone]['E']
    state = {'backbone.' + k: v for k, v in official_mit_state(backbone).items() if not k.startswith('head.')}
    for i, c in enumerate(dims, start=1):
        state[f'decode_head.linear_c{i}.proj.weight'] = torch.randn(E, c)
        state[f'decode_head.linear_c{i}.proj.bias'] = torch.randn(E)
    state['decode_head.linear_fuse.conv.weight'] = torch.randn(E, 4 * E, 1, 1)
    for n in ('weight', 'bias', 'running_mean'):
        state[f'decode_head.linear_fuse.bn.{n}'] = torch.randn(E)
    state['decode_head.linear_fuse.bn.running_var'] = torch.rand(E) + 0.5
    state['decode_head.linear_fuse.bn.num_batches_tracked'] = torch.tensor(1000)
    state['decode_head.linear_pred.weight'] = torch.randn(num_classes, E, 1, 1)
    state['decode_head.linear_pred.bias'] = torch.randn(num_classes)
    state['decode_head.conv_seg.weight'] = torch.randn(num_classes, E, 1, 1)
    state['decode_head.conv_seg.bias'] = torch.randn(num_classes)
    return state


def analytic_params(backbone, out_dims):
    """Parameter count from the architecture's formula (encoder + one decoder per out_dim)."""
    dims, depths, E = OFFICIAL[backbone]['dims'], OFFICIAL[backbone]['depths'], OFFICIAL[backbone]['E']
    n, c_in = 0, 3
    for s, (c, depth) in enumerate(zip(dims, depths)):
        k = 7 if s == 0 else 3
        n += k * k * c_in * c + c + 2 * c  # patch embedding conv + LayerNorm
        block = 4 * c                                  # two LayerNorms
        block += (c * c + c) + (2 * c * c + 2 * c) + (c * c + c)  # q, kv, proj
        if SR[s] > 1:
            block += SR[s] ** 2 * c * c + c + 2 * c    # reduction conv + LayerNorm
        block += (4 * c * c + 4 * c) + (9 * 4 * c + 4 * c) + (4 * c * c + c)  # fc1, dwconv, fc2
        n += depth * block + 2 * c                     # blocks + stage norm
        c_in = c
    for k in out_dims:
        n += sum(c * E + E for c in dims) + 4 * E * E + 2 * E + E * k + k
    return n


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('backbone', ['b0', 'b2'])
def test_parameter_counts_match_the_architecture(backbone):
    for name, outs in [('segformer', [40]), ('depthformer', [2]), ('segdepthformer', [40, 2])]:
        with torch.device('meta'):
            model = build_model(name, backbone, 40)
        assert count(model) == analytic_params(backbone, outs), name


def test_parameter_counts_match_table_1():
    # Table 1 of the paper, 40 classes (NYUv2): within 1%
    for name, paper in [('segformer', 27.3e6), ('depthformer', 27.3e6), ('segdepthformer', 30.5e6)]:
        with torch.device('meta'):
            n = count(build_model(name, 'b2', 40))
        assert abs(n - paper) / paper < 0.01, (name, n)


@pytest.mark.parametrize('backbone', ['b0', 'b1', 'b2'])
def test_output_shapes_small_backbones(backbone):
    torch.manual_seed(0)
    model = build_model('segdepthformer', backbone, 7).eval()
    x = torch.randn(2, 3, 64, 96)
    feats = model.backbone(x)
    assert [tuple(f.shape) for f in feats] == [
        (2, c, 64 // s, 96 // s) for c, s in zip(OFFICIAL[backbone]['dims'], (4, 8, 16, 32))]
    out = model(x)
    assert out['seg_logits'].shape == (2, 7, 64, 96)
    assert out['depth_mean'].shape == out['depth_var'].shape == (2, 64, 96)
    assert (out['depth_mean'] >= 0).all() and (out['depth_var'] > 0).all()


@pytest.mark.parametrize('backbone', ['b3', 'b4', 'b5'])
def test_output_shapes_large_backbones_on_meta(backbone):
    with torch.device('meta'):
        model = build_model('segdepthformer', backbone, 19)
        feats = model.backbone(torch.empty(1, 3, 96, 128))
        out = model(torch.empty(1, 3, 96, 128))
    assert [tuple(f.shape) for f in feats] == [
        (1, c, 96 // s, 128 // s) for c, s in zip(OFFICIAL[backbone]['dims'], (4, 8, 16, 32))]
    assert out['seg_logits'].shape == (1, 19, 96, 128) and out['depth_var'].shape == (1, 96, 128)


@pytest.mark.parametrize('H,W', [(37, 53), (33, 65), (29, 29)])
def test_odd_input_sizes(H, W):
    torch.manual_seed(0)
    model = build_model('segdepthformer', 'b0', 5).eval()
    feats = model.backbone(torch.randn(1, 3, H, W))
    sizes = [(H, W)]
    for _ in range(4):  # each patch embedding rounds up: ceil(H/4), then ceil(./2) three times
        h, w = sizes[-1]
        sizes.append((-(-h // (4 if len(sizes) == 1 else 2)), -(-w // (4 if len(sizes) == 1 else 2))))
    assert [tuple(f.shape[-2:]) for f in feats] == sizes[1:]
    out = model(torch.randn(1, 3, H, W))
    assert out['seg_logits'].shape == (1, 5, H, W) and out['depth_mean'].shape == (1, H, W)


def test_bad_input_shape_says_what_was_expected():
    model = build_model('segformer', 'b0', 5)
    for shape in [(1, 3, 28, 64), (1, 1, 64, 64), (3, 64, 64)]:
        with pytest.raises(ValueError, match=r'expected images \(B, 3, H, W\) with H, W >= 29'):
            model(torch.randn(shape))


def test_eval_is_deterministic():
    torch.manual_seed(0)
    model = build_model('segdepthformer', 'b0', 5).eval()
    x = torch.randn(2, 3, 64, 64)
    a, b = model(x), model(x)
    for k in a:
        assert torch.equal(a[k], b[k])


def test_unknown_backbone_and_model_say_what_was_expected():
    with pytest.raises(ValueError, match="unknown backbone 'b7'.*b0, b1, b2, b3, b4, b5"):
        build_model('segformer', 'b7')
    with pytest.raises(ValueError, match="unknown model 'segnet'.*segdepthformer.*dse"):
        build_model('segnet', 'b0')


# ---------------------------------------------------------------------------------------------
# Checkpoints in the official layouts

@pytest.mark.parametrize('wrap', [None, 'state_dict', 'model'])
def test_load_pretrained_official_layout(tmp_path, wrap):
    state = official_mit_state('b0')
    path = tmp_path / 'mit_b0.pth'
    torch.save(state if wrap is None else {wrap: state, 'meta': {}}, path)
    encoder = mit.MixVisionTransformer('b0')
    mit.load_pretrained(encoder, path)
    loaded = encoder.state_dict()
    assert set(loaded) == set(state) - {'head.weight', 'head.bias'}
    for k in loaded:
        assert torch.equal(loaded[k], state[k]), k


def test_load_pretrained_reports_every_mismatch(tmp_path):
    state = official_mit_state('b0')
    del state['block1.0.attn.q.weight']
    state['block9.0.attn.q.weight'] = torch.randn(3)
    state['norm4.weight'] = torch.randn(512)
    path = tmp_path / 'bad.pth'
    torch.save(state, path)
    with pytest.raises(ValueError) as e:
        mit.load_pretrained(mit.MixVisionTransformer('b0'), path)
    msg = str(e.value)
    assert str(path) in msg
    assert '1 missing keys: block1.0.attn.q.weight' in msg
    assert '1 unexpected keys: block9.0.attn.q.weight' in msg
    assert 'norm4.weight: file (512,) vs model (256,)' in msg
    # a B2 checkpoint into a B0 encoder is a mismatch too, not a silent partial load
    torch.save(official_mit_state('b2'), path)
    with pytest.raises(ValueError, match="holds a MiT-b2 encoder; the model's encoder is MiT-b0"):
        mit.load_pretrained(mit.MixVisionTransformer('b0'), path)


def test_load_pretrained_missing_or_corrupt_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        mit.load_pretrained(mit.MixVisionTransformer('b0'), tmp_path / 'nope.pth')
    bad = tmp_path / 'corrupt.pth'
    bad.write_bytes(b'this is not a checkpoint')
    with pytest.raises(ValueError, match='corrupt.pth'):
        mit.load_pretrained(mit.MixVisionTransformer('b0'), bad)


def test_load_official_segformer_checkpoint(tmp_path, capsys):
    state = official_segformer_state('b0', 40)
    path = tmp_path / 'segformer.b0.pth'
    torch.save({'state_dict': state, 'meta': {'CLASSES': list(range(40))}}, path)
    model = build_model('segformer', 'b0', 40)
    heads.load_segformer_checkpoint(model, path)
    loaded = model.state_dict()
    assert set(loaded) == {k for k in state if 'conv_seg' not in k}
    for k in loaded:
        assert torch.equal(loaded[k], state[k]), k
    # another class count: the encoder alone, and a line that says so
    other = build_model('segformer', 'b0', 19)
    head = {k: v.clone() for k, v in other.decode_head.state_dict().items()}
    heads.load_segformer_checkpoint(other, path)
    assert all(torch.equal(v, state[f'backbone.{k}']) for k, v in other.backbone.state_dict().items())
    assert all(torch.equal(v, head[k]) for k, v in other.decode_head.state_dict().items())
    assert 'its head predicts 40 classes, the model 19' in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# The exact decoder fold (heads.py docstring): folded == textbook

def max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def fold_and_textbook(model, x, dtype):
    """Outputs and parameter gradients of both decoder forms, with the same random draws."""
    model.to(dtype)
    results = []
    for textbook in (False, True):
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout and stochastic-depth masks in both passes
        out = model(x.to(dtype), textbook=textbook)
        torch.manual_seed(2)
        loss = sum((v * torch.randn(v.shape).to(dtype)).sum() for v in out.values())
        loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    return results


def noisy_batchnorm(model):
    for m in model.modules():  # non-trivial statistics and affine parameters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return model


def away_from_the_kinks(model, x, margin=1.0):
    """Shift the inputs of the model's two ReLUs (each decoder's after its BatchNorm, and Eq. 4's
    on the depth mean) to at least `margin` on x, by raising the bias just before each.

    In fp32 the folded and textbook forms round differently, by ~1e-6 relative. A pixel whose
    pre-ReLU value lies within that of 0 can fall on either side of the kink in the two forms,
    and that one pixel moves a gradient by its whole contribution: how many such pixels there
    are depends on the CPU's kernels, not on the algebra. Away from the kinks both forms are the
    same smooth function, and what is left between them is round-off alone. (The float64 test
    below keeps the kinks: there round-off is 1e-16 and no pixel lands that close to 0.)
    A bias shift moves a BatchNorm output by exactly that much in train mode (the batch
    statistics are of its input) and in eval mode; the same seed gives the same masks."""
    decoders = [m for m in model.modules() if isinstance(m, heads.AllMLPDecoder)]
    low = {}
    hooks = [d.linear_fuse.bn.register_forward_hook(
        lambda m, args, out, d=d: low.__setitem__(d, out.min().item())) for d in decoders]
    with torch.no_grad():
        torch.manual_seed(1)
        model(x, textbook=True)
        for d in decoders:
            d.linear_fuse.bn.bias += max(margin - low[d], 0.0)
        for h in hooks:
            h.remove()
        torch.manual_seed(1)
        depth_z = model.depth_head(model.backbone(x))[:, 0]  # before Eq. 4's ReLU
        model.depth_head.linear_pred.bias[0] += max(margin - depth_z.min().item(), 0.0)
    return model


@pytest.mark.parametrize('backbone', ['b0', 'b2'])  # decoder widths 256 and 768, both encoder widths
@pytest.mark.parametrize('train', [False, True])
def test_decoder_fold_equals_textbook_fp32(backbone, train):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 70, 90)
    model = away_from_the_kinks(noisy_batchnorm(build_model('segdepthformer', backbone, 11).train(train)), x)
    (fold, g_fold), (book, g_book) = fold_and_textbook(model, x, torch.float32)
    for k in book:
        assert max_rel(fold[k], book[k]) <= 1e-5, k
    # Relative to each gradient's own size, but at least 1% of the largest one: in train mode
    # BatchNorm's backward cancels the gradient of the stage biases down to ~1e-4 of the
    # largest, and there both forms carry fp32 rounding of that order. A gradient sums ~10^4
    # pixel contributions, in another order in each form: the round-off that leaves is ~2e-6
    # of that size, and 2e-5 allows 10x that for other kernels (the float64 test below shows
    # that the two forms are the same function).
    scale = max(g.abs().max() for g in g_book.values())
    for n in g_book:
        assert (g_fold[n] - g_book[n]).abs().max() <= 2e-5 * max(g_book[n].abs().max(), 0.01 * scale), n


@pytest.mark.parametrize('backbone', ['b0', 'b2'])
@pytest.mark.parametrize('train', [False, True])
def test_decoder_fold_is_exact_in_float64(backbone, train):
    torch.manual_seed(0)
    model = noisy_batchnorm(build_model('segdepthformer', backbone, 11).train(train))
    (fold, g_fold), (book, g_book) = fold_and_textbook(model, torch.randn(2, 3, 70, 90), torch.float64)
    for k in book:
        assert max_rel(fold[k], book[k]) <= 1e-12, k
    scale = max(g.abs().max() for g in g_book.values())
    for n in g_book:  # only gradients that are mathematically 0 (BatchNorm) are left out
        if g_book[n].abs().max() > 1e-9 * scale:
            assert max_rel(g_fold[n], g_book[n]) <= 1e-9, n


def test_fused_width_is_independent_of_grouping():
    # running decoders as one group gives what each gives alone
    torch.manual_seed(0)
    dims, E = (32, 64, 160, 256), 256
    decoders = [heads.AllMLPDecoder(dims, E, k).eval() for k in (3, 2, 5)]
    feats = [torch.randn(2, c, 16 // s, 20 // s) for c, s in zip(dims, (1, 2, 4, 8))]
    together = heads.fused_features(decoders, feats)
    for d, z in zip(decoders, together):
        assert torch.allclose(z, heads.fused_features([d], feats)[0], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# MC Dropout and Deep Sub-Ensembles

def test_mc_dropout_switches_only_dropout_layers():
    torch.manual_seed(0)
    model = build_model('segdepthformer', 'b0', 5).eval()
    x = torch.randn(1, 3, 64, 64)
    ref = model(x)['seg_logits']
    dropouts = [m for m in model.modules() if isinstance(m, (nn.Dropout, nn.Dropout2d))]
    others = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, mit.DropPath, nn.LayerNorm))]
    assert dropouts and others
    rates = [m.p for m in dropouts]
    with uq.mc_dropout(model, 0.5):
        assert all(m.training and m.p == 0.5 for m in dropouts)
        assert not any(m.training for m in others)
        a, b = model(x)['seg_logits'], model(x)['seg_logits']
        assert not torch.allclose(a, b) and not torch.allclose(a, ref)
    assert [m.p for m in dropouts] == rates and not any(m.training for m in model.modules())
    assert torch.equal(model(x)['seg_logits'], ref)
    with uq.mc_dropout(model, 0.0):  # the rate is the one set: p = 0 changes nothing
        assert torch.allclose(model(x)['seg_logits'], ref, atol=1e-6)


def test_mc_dropout_reaches_the_attention():
    # the attention-probability dropout alone (passed to scaled_dot_product_attention) changes the output
    torch.manual_seed(0)
    attn = mit.Attention(32, 2, sr_ratio=2).eval()
    x = torch.randn(1, 64, 32)
    ref = attn(x, 8, 8)
    attn.attn_drop.train()
    attn.attn_drop.p = 0.5
    assert not torch.allclose(attn(x, 8, 8), ref)


def test_dse_single_head_equals_all_heads_and_runs_the_encoder_once():
    torch.manual_seed(0)
    model = build_model('dse', 'b0', 5, num_members=3).eval()
    calls = []
    model.backbone.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(2, 3, 48, 64)
    everything = model(x)
    assert len(calls) == 1
    assert everything['seg_logits'].shape == (3, 2, 5, 48, 64)
    assert everything['depth_mean'].shape == everything['depth_var'].shape == (3, 2, 48, 64)
    for k in range(3):
        one = model(x, head=k)
        for key in one:
            assert torch.allclose(one[key], everything[key][k], atol=1e-5), (k, key)
    # the heads are independently initialised, so they disagree
    assert not torch.allclose(everything['seg_logits'][0], everything['seg_logits'][1])
    single_task = build_model('dse-depthformer', 'b0', 5, num_members=2).eval()
    assert set(single_task(x)) == {'depth_mean', 'depth_var'}


# ---------------------------------------------------------------------------------------------
# Gradient flow

@pytest.mark.parametrize('name', ['segformer', 'depthformer', 'segdepthformer'])
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    model = build_model(name, 'b0', 5, drop_path_rate=0.0).train()  # no branch skipped by chance
    out = model(torch.randn(2, 3, 64, 64))
    sum(v.mean() for v in out.values()).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        # a key bias shifts every logit of a query equally, which softmax ignores: its gradient is 0
        if not n.endswith('attn.kv.bias'):
            assert p.grad.abs().sum() > 0, n


def test_dse_training_step_touches_one_head():
    torch.manual_seed(0)
    model = build_model('dse', 'b0', 5, num_members=3).train()
    out = model(torch.randn(2, 3, 64, 64), head=1)
    (out['seg_logits'].mean() + out['depth_mean'].mean() + out['depth_var'].mean()).backward()
    for k in range(3):
        for head in (model.decode_heads[k], model.depth_heads[k]):
            got = [p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters()]
            assert all(got) if k == 1 else not any(got)
    assert all(p.grad is not None for p in model.backbone.parameters())


def test_load_model_rebuilds_from_a_training_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_model('dse', 'b0', 6, num_members=2).eval()
    path = tmp_path / 'ckpt.pt'
    torch.save({'model': model.state_dict(), 'config': model.config, 'step': 3}, path)
    loaded = heads.load_model(path).eval()
    assert isinstance(loaded, heads.DeepSubEnsemble) and loaded.config == model.config
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(loaded(x)['depth_var'], model(x)['depth_var'])
    torch.save(model.state_dict(), path)
    with pytest.raises(ValueError, match="no 'config' entry"):
        heads.load_model(path)


# ---------------------------------------------------------------------------------------------
# The encoder against references written independently of mit.py

def naive_attention(attn, x, H, W):
    """Efficient self-attention written out: queries from every token; keys and values from the
    (H, W) map shrunk by the sr conv (kernel = stride = R) and its LayerNorm; per head
    softmax(q k^T / sqrt(d)) v; the output projection. kv's output channels are [k; v], each
    split into heads of d contiguous channels (the official layout)."""
    B, N, C = x.shape
    heads_, d = attn.num_heads, C // attn.num_heads
    q = x @ attn.q.weight.T + attn.q.bias
    source = x
    if attn.sr_ratio > 1:
        grid = x.transpose(1, 2).reshape(B, C, H, W)  # token n = row-major pixel (n // W, n % W)
        grid = F.conv2d(grid, attn.sr.weight, attn.sr.bias, stride=attn.sr_ratio)
        source = F.layer_norm(grid.flatten(2).transpose(1, 2), (C,), attn.norm.weight, attn.norm.bias, attn.norm.eps)
    kv = source @ attn.kv.weight.T + attn.kv.bias
    k, v = kv[..., :C], kv[..., C:]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(heads_):
            s = slice(h * d, (h + 1) * d)
            weights = torch.softmax(q[b, :, s] @ k[b, :, s].T / d ** 0.5, dim=-1)  # (N, N_kv)
            out[b, :, s] = weights @ v[b, :, s]
    return out @ attn.proj.weight.T + attn.proj.bias


def naive_mit(encoder, x):
    """The MiT forward written out with F ops and the naive attention: per stage an overlapping
    patch embedding (conv, LayerNorm), pre-norm blocks x + attn(LN x), x + fc2(GELU(dw3x3(fc1(LN x)))),
    the stage LayerNorm, and the tokens back to a (B, C, h, w) map."""
    features = []
    for i in range(1, 5):
        embed = getattr(encoder, f'patch_embed{i}')
        x = F.conv2d(x, embed.proj.weight, embed.proj.bias, stride=embed.proj.stride, padding=embed.proj.padding)
        B, C, H, W = x.shape
        t = F.layer_norm(x.flatten(2).transpose(1, 2), (C,), embed.norm.weight, embed.norm.bias, embed.norm.eps)
        for block in getattr(encoder, f'block{i}'):
            n1 = F.layer_norm(t, (C,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
            t = t + naive_attention(block.attn, n1, H, W)
            n2 = F.layer_norm(t, (C,), block.norm2.weight, block.norm2.bias, block.norm2.eps)
            mlp = block.mlp
            hidden = n2 @ mlp.fc1.weight.T + mlp.fc1.bias
            grid = hidden.transpose(1, 2).reshape(B, -1, H, W)
            grid = F.conv2d(grid, mlp.dwconv.dwconv.weight, mlp.dwconv.dwconv.bias, padding=1, groups=grid.shape[1])
            hidden = F.gelu(grid.flatten(2).transpose(1, 2))
            t = t + hidden @ mlp.fc2.weight.T + mlp.fc2.bias
        norm = getattr(encoder, f'norm{i}')
        t = F.layer_norm(t, (C,), norm.weight, norm.bias, norm.eps)
        x = t.transpose(1, 2).reshape(B, C, H, W)
        features.append(x)
    return features


def randomised(module):
    """Every parameter drawn at random (biases and norms included), so no term is a no-op."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5 / max(1, p[0].numel()) ** 0.5 + (1.0 if p.ndim == 1 and p.numel() > 1 else 0))
    return module


@pytest.mark.parametrize('sr_ratio', [1, 2, 4])
def test_attention_equals_the_naive_reference(sr_ratio):
    torch.manual_seed(0)
    attn = randomised(mit.Attention(40, 4, sr_ratio)).double().eval()
    x = torch.randn(2, 12 * 16, 40, dtype=torch.float64)
    assert torch.allclose(attn(x, 12, 16), naive_attention(attn, x, 12, 16), rtol=1e-10, atol=1e-12)


def test_encoder_equals_the_naive_reference():
    torch.manual_seed(0)
    encoder = randomised(mit.MixVisionTransformer('b0')).double().eval()
    x = torch.randn(2, 3, 45, 70, dtype=torch.float64)  # odd sizes: every stage rounds up
    for got, want in zip(encoder(x), naive_mit(encoder, x)):
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-10)


def test_encoder_equals_hugging_face_segformer(tmp_path):
    # their SegformerModel, written by others, with random weights saved as their files hold
    # them and read by load_pretrained (the one place their names are mapped to ours)
    transformers = pytest.importorskip('transformers', minversion='5')  # an optional package
    torch.manual_seed(0)
    cfg = mit.get_config('b0')
    config = transformers.SegformerConfig(
        hidden_sizes=list(cfg.embed_dims), depths=list(cfg.depths), num_attention_heads=list(cfg.num_heads),
        sr_ratios=list(cfg.sr_ratios), mlp_ratios=[cfg.mlp_ratio] * 4, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, drop_path_rate=0.0)
    theirs = randomised(transformers.SegformerModel(config)).double().eval()
    theirs.save_pretrained(tmp_path / 'mit-b0')
    ours = mit.MixVisionTransformer('b0').double().eval()
    mit.load_pretrained(ours, tmp_path / 'mit-b0')
    theirs_norms = [m for m in theirs.modules() if isinstance(m, nn.LayerNorm)]
    ours_norms = [m for m in ours.modules() if isinstance(m, nn.LayerNorm)]
    for a, b in zip(theirs_norms, ours_norms, strict=True):  # transformers 5 has LayerNorm eps 1e-5
        a.eps = b.eps                                        # everywhere, the official model 1e-6 in places
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        hidden = theirs(pixel_values=x, output_hidden_states=True).hidden_states
        assert len(hidden) == 4
        for got, want in zip(ours(x), hidden):
            assert torch.allclose(got, want, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# The encoder's dropout

@pytest.mark.parametrize('p', [0.2, 0.5])
def test_dropout_keeps_the_stated_fraction_and_the_expectation(p):
    n = 2_000_000
    torch.manual_seed(0)
    y = mit.cpu_dropout(torch.ones(n), p)
    k = round(65536 * (1 - p))  # kept iff a 16-bit random number is below k: probability k / 65536
    keep = k / 65536
    assert abs(keep - (1 - p)) <= 2 ** -17
    assert set(y.unique().tolist()) == {0.0, torch.tensor(65536 / k).item()}  # dropped, or kept and scaled by 1 / keep
    kept = (y > 0).double().mean().item()
    assert abs(kept - keep) < 5 * (keep * (1 - keep) / n) ** 0.5  # 5 binomial standard deviations
    torch.manual_seed(0)
    assert torch.equal(mit.cpu_dropout(torch.ones(n), p), y)  # torch's seed decides the mask
    assert not torch.equal(mit.cpu_dropout(torch.ones(n), p), y)  # and the stream moves on
    x = torch.randn(1000, requires_grad=True)  # with gradients: out of place, mask times scale
    out = mit.cpu_dropout(x, p)
    out.sum().backward()
    assert torch.equal(x.grad, (out != 0) * torch.tensor(65536 / k)) and x.grad.shape == x.shape
    assert torch.equal(mit.cpu_dropout(torch.ones(100), 0.0), torch.ones(100))  # p = 0 keeps everything
    assert torch.equal(mit.cpu_dropout(torch.ones(100), 1e-6), torch.ones(100))  # so does p <= 2^-17 (k = 65536)


def splitmix64_reference(seed, j):
    """Word j of SplitMix64 started at seed, in Python's integers (Steele, Lea and Flood 2014:
    state seed + (j + 1) * gamma, then the output mix), reduced modulo 2^64 at every step."""
    z = (seed + (j + 1) * 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return z ^ (z >> 31)


def test_splitmix64_is_the_published_generator():
    # the first five outputs of SplitMix64 seeded with 1234567, as Rosetta Code's task
    # "Pseudo-random numbers/Splitmix64" publishes them (the seed is the state; each call adds
    # gamma, then mixes)
    want = [6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431,
            16408922859458223821]
    assert [splitmix64_reference(1234567, j) for j in range(5)] == want
    got = mit.splitmix64(np.uint64(1234567), np.arange(5, dtype=np.uint64))
    assert got.dtype == np.uint64 and got.tolist() == want


# k: the rates 0.2 and 0.5, the ends of int16's range (k = 1, 65535), and k on either side of
# one of the drawn numbers (the test draws it first), so that a threshold off by one fails;
# each by numba's kernel and without it (numpy's form), in float64 and float32
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('numba_kernel', [True, False])
@pytest.mark.parametrize('k', [52429, 32768, 1, 65535, 'u0', 'u0+1'])
def test_dropout_mask_is_the_definition_on_the_generators_numbers(k, numba_kernel, dtype, monkeypatch):
    # the docstring's rule, transcribed with Python's integers: SplitMix64 seeded from torch's
    # stream, four 16-bit numbers per 64-bit word (the low 16 bits first), read as int16 plus
    # 32768 (u), an element kept iff u < k, and scaled by 65536 / k (in float32, the scale
    # rounded to float32 first, as torch rounds a Python number it multiplies a float32 tensor by)
    if numba_kernel and mit.dropout_kernel() is None:
        pytest.skip('numba is not installed')
    monkeypatch.setattr(mit, 'NUMBA_DROPOUT', numba_kernel)
    n = 40_001  # more than two of the kernel's chunks, and not a multiple of four
    x = torch.randn(n, dtype=dtype)
    torch.manual_seed(3)
    seed = int(torch.randint(2**62, ()))
    numbers = [(splitmix64_reference(seed, i // 4) >> (16 * (i % 4))) & 0xFFFF for i in range(n)]
    u = [v - 65536 + 32768 if v >= 32768 else v + 32768 for v in numbers]  # int16 reading, plus 32768
    k = {'u0': u[0], 'u0+1': u[0] + 1}.get(k, k)  # u[0] itself dropped, or just kept
    p = 1 - k / 65536  # exact in binary, so that round(65536 * (1 - p)) is k again
    torch.manual_seed(3)
    got = mit.cpu_dropout(x.clone(), p)
    scale = torch.tensor(65536 / k, dtype=dtype)
    want = torch.stack([xi * scale if ui < k else torch.zeros((), dtype=dtype) for xi, ui in zip(x, u)])
    assert torch.equal(got, want)


@pytest.mark.parametrize('shape', [(1,), (3,), (2, 16384), (5, 16385), (1, 2, 300, 77)])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('grad', [False, True])
def test_dropout_numba_kernel_and_numpys_form_agree_bit_for_bit(shape, dtype, grad, monkeypatch):
    # the same masks and products whether numba is installed or not; without gradients both
    # mask x in place, with them the gradient is the mask times the scale
    if mit.dropout_kernel() is None:
        pytest.skip('numba is not installed')
    x = torch.randn(shape, dtype=dtype, requires_grad=grad)
    results = []
    for numba_kernel in (True, False):
        monkeypatch.setattr(mit, 'NUMBA_DROPOUT', numba_kernel)
        torch.manual_seed(5)
        if grad:
            x.grad = None
            y = mit.cpu_dropout(x, 0.2)
            y.sum().backward()
            results.append(torch.cat([y.detach().flatten(), x.grad.flatten()]))
        else:
            copy = x.clone()
            y = mit.cpu_dropout(copy, 0.2)
            assert y.data_ptr() == copy.data_ptr() and torch.equal(y, copy)  # in place
            results.append(y)
    assert torch.equal(*results)


def test_plain_dropout_is_torchs_and_both_forms_keep_the_rate(monkeypatch):
    # FAST_DROPOUT off: exactly F.dropout with the same seed; the speed-up draws other masks at the same rate
    layer = mit.Dropout(0.3)
    x = torch.ones(200_000)
    torch.manual_seed(0)
    fast = layer(x.clone())
    monkeypatch.setattr(mit, 'FAST_DROPOUT', False)
    torch.manual_seed(0)
    plain = layer(x.clone())
    torch.manual_seed(0)
    assert torch.equal(plain, torch.nn.functional.dropout(x.clone(), 0.3, training=True))
    assert not torch.equal(plain, fast)
    n = x.numel()  # each kept fraction within 5 binomial standard deviations of 0.7
    for y in (plain, fast):
        assert abs((y > 0).double().mean().item() - 0.7) < 5 * (0.7 * 0.3 / n) ** 0.5
    assert torch.equal(layer.eval()(x), x)  # eval mode: identity


def test_attention_dropout_in_blocks_has_the_attentions_expectation():
    # E[dropout(P) / keep] = P: the mean over many draws approaches softmax(q k^T / sqrt(d)) v
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 50, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    want = F.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(mit.attention_with_dropout(q, k, v, mit.Dropout(0.0), block=64), want, atol=1e-6)  # 7 blocks
    n = 4000
    draws = torch.stack([mit.attention_with_dropout(q, k, v, mit.Dropout(0.5), block=64) for _ in range(n)]).double()
    # each of the 800 outputs within 5 standard errors of the mean of its draws (a false alarm
    # has probability ~800 * 6e-7), and every output does vary with the masks
    error = (draws.mean(0) - want).abs() / (draws.std(0) / n ** 0.5)
    assert error.max() < 5 and draws.std(0).min() > 0.01


# ---------------------------------------------------------------------------------------------
# The decoder's upsampling: F.interpolate's numbers, faster

@pytest.mark.parametrize('size,out_size', [((7, 9), (14, 18)), ((7, 9), (28, 72)), ((5, 6), (15, 30)),
                                            ((15, 20), (120, 160)), ((7, 9), (13, 20))])  # the last: not whole factors
@pytest.mark.parametrize('channels_last', [False, True])
def test_upsample_equals_interpolate(size, out_size, channels_last):
    # added into a map: by matrix products into a channels_last one (from x of either layout),
    # through F.interpolate into the other
    torch.manual_seed(0)
    x = torch.randn(2, 5, *size, dtype=torch.float64)
    want = F.interpolate(x, out_size, mode='bilinear', align_corners=False)
    base = torch.randn(2, 5, *out_size, dtype=torch.float64)
    if channels_last:  # the decoders' maps
        base = base.contiguous(memory_format=torch.channels_last)
    assert base.clone().permute(0, 2, 3, 1).is_contiguous() == channels_last  # which path is tested
    for source in (x, x.contiguous(memory_format=torch.channels_last)):
        added = heads.upsample(source, out_size, out=base.clone())
        assert torch.allclose(added, base + want, rtol=0, atol=1e-14)  # float64 round-off
    # gradients, through the in-place writes, as F.interpolate's
    g = torch.randn(2, 5, *out_size, dtype=torch.float64)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    (heads.upsample(a, out_size, out=base.clone()) * g).sum().backward()
    (F.interpolate(b, out_size, mode='bilinear', align_corners=False) * g).sum().backward()
    assert torch.allclose(a.grad, b.grad, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# The decoder's Dropout2d on the prediction layer's weights: the plain form's numbers, faster

@pytest.mark.parametrize('p', [0.1, 0.5])
def test_dropped_pointwise_is_dropout2d_then_the_layer(p):
    # a channel slice of a channels_last map, as fused_features hands each decoder; in float64,
    # so that the sums over channels taken in another order agree to round-off; with the same
    # seed the same masks, and the same gradients for the map and the layer
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 3, 1).double()
    x = torch.randn(3, 32, 5, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)[:, 8:24]
    g = torch.randn(3, 3, 5, 7, dtype=torch.float64)
    results = []
    for form in ('plain', 'fast'):
        xi = x.clone().requires_grad_()
        conv.zero_grad()
        torch.manual_seed(1)
        if form == 'plain':
            y = heads.pointwise(F.dropout2d(xi, p, training=True), conv.weight, conv.bias)
        else:
            y = heads.dropped_pointwise(xi, conv, p)
        (y * g).sum().backward()
        results.append((y.detach(), xi.grad, conv.weight.grad.clone(), conv.bias.grad.clone()))
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    dropped = results[0][1].abs().sum(dim=(2, 3)) == 0  # (B, C): whole channels, per image
    assert dropped.any() and not dropped.all()


def test_kept_folds_follow_every_change_of_the_weights():
    # without gradients the folds are kept between calls; each change that a user makes (eval
    # and train, load_state_dict, an optimiser step, a weight replaced) gives the folds afresh
    torch.manual_seed(0)
    model = build_model('segdepthformer', 'b0', 5).eval()
    decoders = [model.decode_head, model.depth_head]
    x = torch.randn(1, 3, 64, 96)

    def check():
        with torch.no_grad():
            (kept, kept_bias), (fresh, fresh_bias) = heads.kept_folds(decoders, 4), heads.stacked_folds(decoders)
            assert all(torch.equal(a, b) for a, b in zip([*kept, kept_bias], [*fresh, fresh_bias]))
    check()
    first = heads.kept_folds(decoders, 4)
    assert heads.kept_folds(decoders, 4) is first  # kept: the same tensors, not computed again
    model.train()
    check()
    model.eval()
    state = {k: v + 0.01 for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    check()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x)['depth_mean'].mean().backward()  # with gradients: not kept, the plain form
    optimizer.step()
    model.eval()
    check()
    model.depth_head.linear_pred.weight = nn.Parameter(torch.zeros_like(model.depth_head.linear_pred.weight))
    model.decode_head.linear_c1.proj.weight = nn.Parameter(torch.randn_like(model.decode_head.linear_c1.proj.weight))
    check()
    model.half()  # new memory for every weight (.data swapped), then back: the old memory may be free again
    model.float()
    check()
    with torch.no_grad():  # and the model's output with them is the textbook decoder's
        assert torch.allclose(model(x)['seg_logits'], model(x, textbook=True)['seg_logits'], atol=1e-5)


# torch warns that it loops over the members for baddbmm_, which has no vmap rule; the
# DeepEnsemble that runs it under vmap silences the same warning (uq.py)
@pytest.mark.filterwarnings('ignore:There is a performance drop')
def test_upsample_under_vmap_equals_each_member():
    torch.manual_seed(0)
    x = torch.randn(3, 1, 4, 6, 8)  # 3 members
    z = torch.randn(3, 1, 12, 32, 4).permute(0, 1, 4, 2, 3)  # each member's map channels_last
    batched = torch.func.vmap(lambda xi, zi: heads.upsample(xi, (12, 32), out=zi.clone()))(x, z)
    for i in range(3):
        assert torch.allclose(batched[i], z[i] + F.interpolate(x[i], (12, 32), mode='bilinear'), atol=1e-6)
