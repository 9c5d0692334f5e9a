"""predict.py: every output file in its documented format and equal to uq.predict's numbers
within its quantisation step; broken inputs named and skipped; --size, Deep Ensembles and MC
Dropout; class names and palette from the checkpoint; the exported ONNX network against
PyTorch, and the methods it refuses to export."""

import importlib.util
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bench
import data
import predict
import uq
from heads import load_model
from test_evaluate import one_thread, write_checkpoint  # noqa: F401 (one_thread: an autouse fixture)

K = data.NUM_CLASSES['synthetic']
HAS_ONNX = all(importlib.util.find_spec(m) for m in ('onnx', 'onnxruntime'))  # optional extras


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp('checkpoints')
    meta = data.checkpoint_meta('synthetic', objective='eq7')
    return {'sdf': write_checkpoint(d / 'sdf.pt', 'segdepthformer', 0, meta),
            'members': [write_checkpoint(d / f'member{i}.pt', 'segdepthformer', 10 + i) for i in range(2)],
            'dse': write_checkpoint(d / 'dse.pt', 'dse', 3, meta, num_members=2)}


def random_image(path, h, w, seed):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    """Two sizes, PNG and JPEG; a truncated PNG, a text file and an image below the minimum."""
    d = tmp_path_factory.mktemp('images')
    random_image(d / 'a.png', 64, 96, 0)
    random_image(d / 'b.jpg', 64, 96, 1)
    random_image(d / 'c.png', 80, 120, 2)
    random_image(d / 'small.png', 20, 40, 3)
    (d / 'broken.png').write_bytes((d / 'a.png').read_bytes()[:2000])
    (d / 'notes.txt').write_text('not an image\n')
    return d


def reference(model, paths, method='none', **kwargs):
    """uq.predict on the images read independently of predict.py, as one batch."""
    x = torch.stack([data.normalize(torch.from_numpy(np.array(Image.open(p).convert('RGB'))).permute(2, 0, 1)
                                    .float() / 255) for p in paths])
    return uq.predict(model, x, method, **kwargs)


def test_folder_with_broken_files(ckpt, images, tmp_path, capsys):
    out = tmp_path / 'out'
    assert predict.main([ckpt['sdf'], str(images), '--out', str(out), '--batch-size', '2']) == 1
    err = capsys.readouterr().err
    for bad in ('broken.png', 'notes.txt', 'small.png'):
        assert f'error: {images / bad}' in err and f'{images / bad}:' in err.split('skipped 3:')[1]
    assert 'below the encoder\'s minimum' in err and 'not a readable image' in err
    manifest = json.loads((out / 'predict.json').read_text())
    assert [m['input'] for m in manifest['images']] == [str(images / n) for n in ('a.png', 'b.jpg', 'c.png')]
    assert sorted(s['input'] for s in manifest['skipped']) == sorted(str(images / n) for n in
                                                                     ('broken.png', 'notes.txt', 'small.png'))
    assert manifest['classes'] == list(data.SYNTHETIC_CLASSES) and manifest['method'] == 'none'
    assert manifest['name'] == 'SegDepthFormer-B0'

    # a and b (64x96) form one batch of --batch-size 2, c (80x120) another
    model = load_model(ckpt['sdf']).eval()
    preds = {**dict(zip('ab', [reference(model, [images / 'a.png', images / 'b.jpg'])] * 2)),
             'c': reference(model, [images / 'c.png'])}
    scale = math.log(K) / 65535
    assert manifest['files']['_entropy.png']['scale'] == scale
    for name, i, (h, w) in (('a', 0, (64, 96)), ('b', 1, (64, 96)), ('c', 0, (80, 120))):
        pred = preds[name]
        read = lambda suffix: Image.open(out / f'{name}{suffix}')
        seg, classes = read('_seg.png'), read('_classes.png')
        assert seg.mode == 'P' and classes.mode == 'L' and seg.size == classes.size == (w, h)
        assert np.array_equal(np.array(seg), pred.pred[i].numpy()) and np.array_equal(np.array(classes), np.array(seg))
        assert np.array_equal(np.array(seg.getpalette()).reshape(-1, 3)[:K], data.SYNTHETIC_PALETTE)

        entropy, depth, std = (np.load(out / f'{name}{s}.npy') for s in ('_entropy', '_depth', '_depth_std'))
        assert entropy.dtype == depth.dtype == std.dtype == np.float32
        assert entropy.shape == depth.shape == std.shape == (h, w)
        torch.testing.assert_close(torch.from_numpy(entropy), pred.entropy[i], rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.from_numpy(depth), pred.depth_mean[i], rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.from_numpy(std), pred.depth_var[i].sqrt(), rtol=0, atol=1e-6)

        pngs = {s: read(s) for s in ('_entropy.png', '_depth.png', '_depth_std.png')}
        for suffix, im in pngs.items():
            assert np.array(im).dtype == np.uint16 and im.size == (w, h)
            assert float(im.text['scale']) == manifest['files'][suffix]['scale'] and im.text['unit']
        assert np.abs(np.array(pngs['_entropy.png']) * scale - entropy).max() <= scale / 2 + 1e-6
        for values, im in ((depth, pngs['_depth.png']), (std, pngs['_depth_std.png'])):
            below = values < 65.535  # the PNGs saturate at 65535 mm
            error = np.abs(np.array(im) / 1000 - values)[below]
            assert (error <= 0.0005 + np.spacing(values[below])).all()
        assert read('_panels.png').width > w


def test_size_resizes_back_to_each_image(ckpt, images, tmp_path):
    out = tmp_path / 'out'
    args = [ckpt['sdf'], str(images / 'a.png'), str(images / 'c.png'), '--out', str(out), '--size', '64', '64',
            '--batch-size', '2']
    assert predict.main(args) == 0
    for name, size in (('a', (64, 96)), ('c', (80, 120))):
        assert np.load(out / f'{name}_depth.npy').shape == size
        assert Image.open(out / f'{name}_classes.png').size == size[::-1]
        entropy = np.load(out / f'{name}_entropy.npy')
        assert np.isfinite(entropy).all() and (entropy >= 0).all()


def test_deep_ensemble_sub_ensemble_and_mc_dropout(ckpt, images, tmp_path, capsys):
    pattern = str(images / '*.jpg')  # a pattern the script expands itself
    assert predict.main([*ckpt['members'], pattern, '--out', str(tmp_path / 'de')]) == 0
    manifest = json.loads((tmp_path / 'de' / 'predict.json').read_text())
    assert manifest['method'] == 'de' and manifest['name'] == 'SegDepthFormer-B0 (DE x2)'
    # the members carry no class names: a warning, and names and colours that say so
    assert 'carries no class names' in capsys.readouterr().err
    assert manifest['classes'] == [f'class_{k}' for k in range(K)] and len(manifest['palette']) == K
    members = [load_model(p) for p in ckpt['members']]
    pred = reference(members, [images / 'b.jpg'], 'de')
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / 'de' / 'b_depth.npy')), pred.depth_mean[0],
                               rtol=0, atol=1e-6)

    args = [ckpt['sdf'], pattern, '--out', str(tmp_path / 'mcd'), '--method', 'mcd', '--samples', '2']
    assert predict.main(args) == 0
    manifest = json.loads((tmp_path / 'mcd' / 'predict.json').read_text())
    assert manifest['method'] == 'mcd' and manifest['name'] == 'SegDepthFormer-B0 (MCD 20%)'
    assert (tmp_path / 'mcd' / 'b_depth_std.png').exists()

    assert predict.main([ckpt['dse'], pattern, '--out', str(tmp_path / 'dse')]) == 0
    manifest = json.loads((tmp_path / 'dse' / 'predict.json').read_text())
    assert manifest['method'] == 'dse' and manifest['name'] == 'SegDepthFormer-B0 (DSE x2)'


def test_settings_name_only_the_methods_parameters(ckpt, images, tmp_path):
    # a single network has no samples or dropout rate; MC Dropout lists its own
    assert predict.main([ckpt['sdf'], str(images / 'a.png'), '--out', str(tmp_path / 'one')]) == 0
    settings = json.loads((tmp_path / 'one' / 'predict.json').read_text())['settings']
    assert not {'samples', 'dropout', 'seed'} & set(settings) and settings['precision'] == 'auto'
    args = [ckpt['sdf'], str(images / 'a.png'), '--out', str(tmp_path / 'mcd'), '--method', 'mcd', '--samples', '2']
    assert predict.main(args) == 0
    settings = json.loads((tmp_path / 'mcd' / 'predict.json').read_text())['settings']
    assert (settings['samples'], settings['dropout'], settings['seed']) == (2, 0.2, 0)
    # test-time drop-path samples, but has no dropout rate
    args = [ckpt['sdf'], str(images / 'a.png'), '--out', str(tmp_path / 'dp'), '--method', 'drop-path', '--samples', '2']
    assert predict.main(args) == 0
    settings = json.loads((tmp_path / 'dp' / 'predict.json').read_text())['settings']
    assert (settings['samples'], settings['seed']) == (2, 0) and 'dropout' not in settings


def test_16_bit_images_are_read_as_16_bit(tmp_path):
    # a 16-bit greyscale PNG spanning 0..65535: scaled by 1/65535 on all three channels, where
    # an 8-bit conversion would clip every value above 255 to white
    values = np.arange(64 * 96, dtype=np.uint16).reshape(64, 96) * 10
    Image.fromarray(values).save(tmp_path / 'deep.png')
    assert Image.open(tmp_path / 'deep.png').mode == 'I;16'
    rgb = predict.read_image(tmp_path / 'deep.png')
    assert rgb.shape == (64, 96, 3) and rgb.dtype == np.float32
    for c in range(3):
        np.testing.assert_allclose(rgb[:, :, c], values / 65535, rtol=0, atol=1e-7)  # float32 rounding
    random_image(tmp_path / 'rgb.png', 64, 96, 5)  # an 8-bit image: / 255, as before
    np.testing.assert_allclose(predict.read_image(tmp_path / 'rgb.png'),
                               np.array(Image.open(tmp_path / 'rgb.png')) / 255, rtol=0, atol=1e-7)
    Image.fromarray(np.ones((64, 96), np.float32)).save(tmp_path / 'float.tif')
    with pytest.raises(ValueError, match=r'float\.tif: F mode .* convert it to an 8- or 16-bit image'):
        predict.read_image(tmp_path / 'float.tif')


def test_a_missing_checkpoint_is_one_error_and_leaves_no_folder(images, tmp_path):
    with pytest.raises(FileNotFoundError, match='checkpoint not found: .*nope.pt'):
        predict.main([str(tmp_path / 'nope.pt'), str(images / 'a.png'), '--out', str(tmp_path / 'out')])
    assert not (tmp_path / 'out').exists()
    with pytest.raises(FileNotFoundError, match='checkpoint not found'):
        predict.main([str(tmp_path / 'nope.pt'), '--export', 'onnx', '--out', str(tmp_path / 'x' / 'm.onnx')])
    assert not (tmp_path / 'x').exists()


def test_a_run_that_reads_no_input_leaves_out_free(ckpt, images, tmp_path, capsys):
    out = tmp_path / 'out'
    with pytest.raises(ValueError, match='nope.png: no such file'):  # no input at all: before any folder
        predict.main([ckpt['sdf'], str(tmp_path / 'nope.png'), '--out', str(out)])
    assert not out.exists()
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='no files in'):
        predict.main([ckpt['sdf'], str(tmp_path / 'empty'), '--out', str(out)])
    assert not out.exists()
    # inputs that are all unreadable: skipped, nothing written, and the same --out takes the next run
    assert predict.main([ckpt['sdf'], str(images / 'notes.txt'), str(images / 'broken.png'), '--out', str(out)]) == 1
    assert 'wrote nothing' in capsys.readouterr().err and not any(out.iterdir())
    assert predict.main([ckpt['sdf'], str(images / 'a.png'), '--out', str(out)]) == 0
    assert [m['input'] for m in json.loads((out / 'predict.json').read_text())['images']] == [str(images / 'a.png')]


def test_export_lands_under_the_ignored_out_folder():
    # out/ is in .gitignore: the default never writes into the repository's root
    assert predict.export_path('runs/emuformer/best.pt') == 'out/emuformer_best.onnx'
    root = Path(__file__).resolve().parents[1]
    assert '/out/' in (root / '.gitignore').read_text().split()


def test_class_names_and_palette_come_from_the_checkpoint(images, tmp_path):
    palette = [[255, 0, 0], [0, 255, 0], [0, 0, 255]]
    meta = {'data': 'mine', 'classes': ['sky', 'road', 'tree'], 'palette': palette, 'objective': 'eq7'}
    path = write_checkpoint(tmp_path / 'seg3.pth', 'segformer', 5, meta, num_classes=3)
    assert predict.main([path, str(images / 'a.png'), '--out', str(tmp_path / 'out')]) == 0
    seg = Image.open(tmp_path / 'out' / 'a_seg.png')
    assert seg.mode == 'P' and np.array(seg.getpalette()).reshape(-1, 3)[:3].tolist() == palette
    manifest = json.loads((tmp_path / 'out' / 'predict.json').read_text())
    assert manifest['classes'] == ['sky', 'road', 'tree'] and manifest['palette'] == palette
    assert not (tmp_path / 'out' / 'a_depth.png').exists()  # a SegFormer predicts no depth


def test_refuses_to_replace_results_and_clashing_names(ckpt, images, tmp_path):
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'a_seg.png').write_bytes(b'earlier result')
    with pytest.raises(FileExistsError, match='--overwrite'):
        predict.main([ckpt['sdf'], str(images / 'a.png'), '--out', str(tmp_path / 'out')])
    random_image(tmp_path / 'a.jpg', 64, 64, 4)
    with pytest.raises(ValueError, match='same output files'):
        predict.main([ckpt['sdf'], str(images / 'a.png'), str(tmp_path / 'a.jpg'), '--out', str(tmp_path / 'new')])


def test_export_refuses_mc_dropout_and_ensembles(ckpt, tmp_path):
    out = str(tmp_path / 'model.onnx')
    with pytest.raises(ValueError, match='dropout is an identity'):
        predict.main([ckpt['sdf'], '--export', 'onnx', '--method', 'mcd', '--out', out])
    with pytest.raises(ValueError, match='Deep Sub-Ensemble is not exported'):
        predict.main([ckpt['dse'], '--export', 'onnx', '--out', out])
    with pytest.raises(ValueError, match='export each member'):
        predict.main([*ckpt['members'], '--export', 'onnx', '--out', out])


@pytest.mark.parametrize('softmax_and_entropy', [predict.softmax_and_entropy, predict.softmax_and_entropy_rows])
def test_softmax_and_entropy_is_the_definition(softmax_and_entropy):
    torch.manual_seed(0)
    y = torch.randn(2, 5, 3, 4) * 10
    y[0, :, 0, 0] = torch.tensor([0.0, -200.0, 0.0, 0.0, 0.0])  # a class whose softmax underflows to 0 in fp32
    p, h = softmax_and_entropy(y)
    assert p.shape == y.shape and h.shape == (2, 3, 4)
    y64 = y.double()
    p64 = torch.exp(y64 - torch.logsumexp(y64, dim=1, keepdim=True))
    h64 = -(p64 * torch.log(p64).nan_to_num(neginf=0.0)).sum(dim=1)  # 0 log 0 = 0
    # fp32 arithmetic against a float64 transcription of Eq. 1 and Eq. 3: the error grows with
    # the logits' differences d (here up to about 60), eps * |d| ~ 1e-5 at most, and p d is small
    # where d is large; likewise log_softmax = d - log s in the rows form; 1e-5 holds with room
    # on any CPU
    assert torch.allclose(p.double(), p64, atol=1e-6) and torch.allclose(h.double(), h64, atol=1e-5)
    assert torch.isfinite(h).all() and (h >= 0).all() and abs(h[0, 0, 0].item() - math.log(4)) < 1e-6


@pytest.mark.skipif(not HAS_ONNX, reason='onnx and onnxruntime are optional extras')
@pytest.mark.parametrize('fast', [True, False])
def test_the_exported_graph_takes_each_softmax_over_a_last_axis(ckpt, fast, monkeypatch):
    import onnx
    monkeypatch.setattr(predict, 'FAST_OUTPUTS', fast)
    graph = onnx.load_from_string(predict.onnx_bytes(predict.FoldedNetwork(load_model(ckpt['sdf'])), {})).graph
    ops = [node.op_type for node in graph.node]
    softmaxes = [(node.op_type, node.attribute[0].i, node.name.startswith('/backbone/'))
                 for node in graph.node if node.op_type in ('Softmax', 'LogSoftmax')]
    # every softmax over the last axis, where onnxruntime needs no transpose: the encoder's
    # attention (8 blocks in B0) and, over the pixel rows, the probabilities and their logarithm
    # once each; the plain form takes them from one Exp of the logits instead
    encoder = [('Softmax', -1, True)] * 8
    if fast:
        assert sorted(softmaxes) == sorted(encoder + [('Softmax', -1, False), ('LogSoftmax', -1, False)])
        assert 'Exp' not in ops
    else:
        assert softmaxes == encoder and ops.count('Exp') == 1


@pytest.mark.parametrize('chunk', [128, 96])  # 96: the chunks of a head's 256 channels (B0) are 96, 96 and 64
def test_chunked_heads_are_the_whole_fused_map(ckpt, chunk, monkeypatch):
    network = predict.FoldedNetwork(load_model(ckpt['sdf']))
    monkeypatch.setattr(predict, 'CHUNK', chunk)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        fast = network(x)
        monkeypatch.setattr(predict, 'FAST_DECODER', False)  # the whole map, a product per head
        plain = network(x)
    for name, a, b in zip(network.output_names, fast, plain):
        # the same products, their sums over a head's channels split into chunks: only the
        # float32 rounding of those sums differs, about 1e-6 of the largest output where the
        # terms of a sum cancel (measured up to about 2e-6); 1e-5 leaves room, and a chunk
        # left out or counted twice, or the bias in every chunk, moves an output by far more
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-5 * b.abs().max(), name


@pytest.mark.skipif(not HAS_ONNX, reason='onnx and onnxruntime are optional extras')
@pytest.mark.parametrize('fast', [True, False])
def test_the_exported_decoder_has_no_conv_and_slices_no_map(ckpt, fast, monkeypatch):
    import onnx
    monkeypatch.setattr(predict, 'FAST_DECODER', fast)
    graph = onnx.load_from_string(predict.onnx_bytes(predict.FoldedNetwork(load_model(ckpt['sdf'])), {})).graph
    # the TorchScript-based exporter names each node by the module that made it: /backbone/...
    decoder = [node for node in graph.node if not node.name.startswith('/backbone/')]
    assert 'Conv' not in [node.op_type for node in decoder]  # the 1x1 products are MatMuls (heads.pointwise)
    shapes = {node.output[0] for node in graph.node if node.op_type == 'Shape'}
    sliced = [node for node in decoder if node.op_type == 'Slice' and node.input[0] not in shapes]
    # in chunks, each head's maps are made apart and its prediction layer reads them where they
    # lie: the only Slices are of shapes; made whole, each head's channels are copied out of z
    assert not sliced if fast else len(sliced) == 2


class Flattens(torch.nn.Module):
    def forward(self, x):  # x (B, C, H, W), C = 3
        return (x.permute(0, 2, 3, 1).flatten(1, 2),  # a: the size after the flattened ones is a constant, C
                x.flatten(2),                         # b: none comes after them
                x.flatten(0, 1), x.flatten(1, 2))     # c, d: H and W, or W, come after them: not constants


@pytest.mark.skipif(not HAS_ONNX, reason='onnx and onnxruntime are optional extras')
@pytest.mark.filterwarnings('ignore::DeprecationWarning')  # the TorchScript-based exporter's, as onnx_bytes ignores it
@pytest.mark.parametrize('fast', [True, False])
def test_flatten_in_the_export_is_torchs(fast):
    import onnx
    import onnxruntime
    buffer = io.BytesIO()
    if fast:
        torch.onnx.register_custom_op_symbolic('aten::flatten', predict.onnx_flatten, predict.OPSET)
    try:
        torch.onnx.export(Flattens(), (torch.zeros(2, 3, 5, 7),), buffer, input_names=['x'], output_names=list('abcd'),
                          dynamic_axes={'x': {0: 'batch', 2: 'height', 3: 'width'}}, opset_version=predict.OPSET,
                          **predict.TORCHSCRIPT_EXPORTER)
    finally:
        if fast:
            torch.onnx.unregister_custom_op_symbolic('aten::flatten', predict.OPSET)
    graph = onnx.load_from_string(buffer.getvalue()).graph
    made_by = {output: node for node in graph.node for output in node.output}
    targets = {name: made_by[made_by[name].input[1]] for name in 'ab' if made_by[name].op_type == 'Reshape'}
    constant = {name: onnx.numpy_helper.to_array(node.attribute[0].t).tolist()
                for name, node in targets.items() if node.op_type == 'Constant'}
    # the speed-up's constant targets where it knows every size after the flattened ones (0:
    # keep that dimension); PyTorch's own translation reads them from x's shape
    assert constant == ({'a': [0, -1, 3], 'b': [0, 0, -1]} if fast else {})
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=['CPUExecutionProvider'])
    for size in ((1, 3, 5, 7), (2, 3, 4, 9)):  # the second: another batch, height and width than traced
        x = torch.randn(*size)
        for ours, theirs in zip(Flattens()(x), session.run(None, {'x': x.numpy()})):
            assert theirs.shape == tuple(ours.shape) and np.array_equal(theirs, ours.numpy())


@pytest.mark.skipif(not HAS_ONNX, reason='onnx and onnxruntime are optional extras')
@pytest.mark.parametrize('fast', [True, False])
def test_the_exported_graph_reads_the_shape_of_no_conv_but_the_patch_embeddings(ckpt, fast, monkeypatch):
    import onnx
    monkeypatch.setattr(predict, 'FAST_FLATTEN', fast)
    graph = onnx.load_from_string(predict.onnx_bytes(predict.FoldedNetwork(load_model(ckpt['sdf'])), {})).graph
    made_by = {output: node for node in graph.node for output in node.output}
    read = set()  # the convs whose output, or a transpose of it, a Shape node reads
    for node in graph.node:
        source = made_by.get(node.input[0]) if node.op_type == 'Shape' else None  # None: a graph input
        if source is not None and source.op_type == 'Transpose':
            source = made_by.get(source.input[0])
        if source is not None and source.op_type == 'Conv':
            read.add(source.name)
    patch_embeddings = {node.name for node in graph.node if node.op_type == 'Conv' and '/patch_embed' in node.name}
    assert len(patch_embeddings) == 4
    # each patch embedding's output size is the encoder's h, w (mit.OverlapPatchEmbed); with the
    # speed-up no other conv's shape is read, so onnxruntime need not copy those maps out of
    # its blocked layout; the exporter's own flatten reads every conv's
    if fast:
        assert read == patch_embeddings
    else:
        assert read > patch_embeddings


@pytest.mark.skipif(not HAS_ONNX, reason='onnx and onnxruntime are optional extras')
def test_onnx_export_matches_pytorch(ckpt, tmp_path, capsys):
    import onnxruntime
    path = tmp_path / 'sdf.onnx'
    assert predict.main([ckpt['sdf'], '--export', 'onnx', '--out', str(path)]) == 0
    printed = capsys.readouterr().out  # the export checks itself against PyTorch and says how close
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    assert json.loads(session.get_modelmeta().custom_metadata_map['classes']) == list(data.SYNTHETIC_CLASSES)
    model = load_model(ckpt['sdf']).eval()
    names = ('seg_probs', 'seg_entropy', 'depth_mean', 'depth_var')
    assert [o.name for o in session.get_outputs()] == list(names)
    torch.manual_seed(0)
    # two sizes (one not a multiple of 32: every stage's map size is rounded up) and a batch of 2
    for x in (torch.randn(1, 3, 64, 96), torch.randn(1, 3, 77, 101), torch.randn(2, 3, 64, 96)):
        pred = uq.predict(model, x, 'none')
        outputs = session.run(None, {'image': x.numpy()})
        for name, ours, theirs in zip(names, (pred.probs, pred.entropy, pred.depth_mean, pred.depth_var), outputs):
            # the same fp32 arithmetic through onnxruntime's kernels instead of PyTorch's differs
            # by rounding accumulated over the encoder's layers, of order 1e-5 of the largest
            # value; 1e-4 leaves room for other CPUs' kernels and is far below what a wrong
            # operator or weight would give
            assert theirs.shape == tuple(ours.shape), name
            relative = np.abs(theirs - ours.numpy()).max() / np.abs(ours.numpy()).max()
            print(f'{name} {tuple(x.shape)}: max |onnx - torch| / max |torch| = {relative:.2e}')
            assert relative <= 1e-4, (name, tuple(x.shape), relative)
    figures = dict(re.findall(r'(\w+) (\d\.\de[-+]\d+)', printed.split('parity, ')[1]))
    assert set(figures) == set(names) and all(float(v) <= 1e-4 for v in figures.values())


@pytest.mark.skipif(not HAS_ONNX, reason='onnx and onnxruntime are optional extras')
@pytest.mark.parametrize('row', list(bench.PLAIN_EXPORT))
def test_each_plain_form_of_the_export_matches_pytorch(ckpt, row, monkeypatch):
    import onnxruntime
    for module, flag in bench.PLAIN_EXPORT[row]:  # the form bench.py times beside the export
        monkeypatch.setattr(module, flag, False)
    model = load_model(ckpt['sdf']).eval()
    session = predict.onnx_session(onnxruntime, predict.onnx_bytes(predict.FoldedNetwork(model), {}))
    x = torch.randn(2, 3, 77, 101, generator=torch.Generator().manual_seed(0))  # not the traced size
    pred = uq.predict(model, x, 'none')
    outputs = session.run(None, {'image': x.numpy()})
    for ours, theirs in zip((pred.probs, pred.entropy, pred.depth_mean, pred.depth_var), outputs):
        # 1e-4 of the largest value, as test_onnx_export_matches_pytorch
        assert theirs.shape == tuple(ours.shape)
        assert np.abs(theirs - ours.numpy()).max() <= 1e-4 * np.abs(ours.numpy()).max()


@pytest.mark.skipif(not HAS_ONNX, reason='onnx and onnxruntime are optional extras')
def test_bench_onnx_row():
    # 128x192: at 64x96 the peak of the chunked export's row read 0 in one run (and 0.9 MB in
    # another), too near nothing for this check
    tiny = ['--backbone', 'b0', '--size', '128', '192', '--num-classes', '5', '--warmup', '1', '--iters', '2',
            '--device', 'cpu', '--threads', '1']
    rows = {r['key']: r for r in bench.main(tiny + ['--rows', 'segdepthformer', '--onnx'])}
    assert list(rows) == ['segdepthformer', 'onnx', *bench.PLAIN_EXPORT]
    for key in bench.ONNX_ROWS:
        assert rows[key]['params'] == rows['segdepthformer']['params']
        assert rows[key]['latency_ms_median'] > 0 and rows[key]['peak_bytes'] > 0
