"""
Use a trained model on your own images, and ship the single network as one ONNX file.

Predicting. Any checkpoint of train.py or distill.py, with any uncertainty method (uq.py), on
image files, folders and glob patterns:

    python predict.py runs/emuformer/best.pt photos/ --out out/photos              # one network
    python predict.py runs/sdf/best.pt 'photos/*.jpg' --out out/mcd --method mcd --samples 10 --dropout 0.2
    python predict.py runs/dse/best.pt photos/ --out out/dse                       # a DSE: method dse
    python predict.py runs/sdf_seed*/best.pt photos/ --out out/de                  # a Deep Ensemble: de
    python predict.py runs/emuformer/best.pt big/ --out out/big --size 480 640 --batch-size 8

Positional arguments ending in .pt or .pth are checkpoints (several: a Deep Ensemble), the
rest are inputs: an image file, a folder (every file in it, sorted; not its sub-folders, so an
output folder inside it is never read back as input), or a glob pattern, which the script
expands itself (so a quoted pattern works too). An image is used at its own size, which must
be at least mit.MIN_SIZE (29) pixels on each side, or with --size H W resized for the network
(bilinear, antialiased) and every output resized back to the image's size: probabilities,
entropy, depth and variance bilinearly, the class map the argmax of the resized
probabilities. Images of equal network-input size are batched (--batch-size), on the GPU if
there is one (--device), under --precision (default auto: bf16 or fp16 autocast on a GPU,
fp32 on a CPU; plumbing.autocast_dtype); the sampling methods' masks are seeded (--seed), so a rerun
writes the same files. An 8-bit image is read as it is; a 16-bit one (greyscale or RGB PNG,
TIFF) is scaled from 0..65535 to [0, 1] like an 8-bit one from 0..255, never cut to 8 bits; a
32-bit or floating-point one is refused. A file that is not an image, is broken, too small or
refused is reported by name and skipped; the others are still predicted, and the exit status
is then 1, with the list of what was skipped.

For each image STEM.ext, written atomically into --out (which must be empty unless --overwrite):

    STEM_seg.png        the class map as a palette PNG, in the checkpoint's colours
    STEM_classes.png    the class ids, 8-bit greyscale (16-bit with more than 255 classes, so
                        that 255, data.IGNORE_INDEX, never means a class in an 8-bit file)
    STEM_entropy.png    entropy of the mean softmax (Eq. 3), 16-bit: nats = value * log(K) / 65535
    STEM_entropy.npy    the same, float32 nats
    STEM_depth.png      mean depth, 16-bit millimetres; it saturates: 65535 means 65.535 m or more
    STEM_depth.npy      the same, float32 metres
    STEM_depth_std.png  predictive standard deviation (Eq. 10), 16-bit millimetres, saturating alike
    STEM_depth_std.npy  the same, float32 metres
    STEM_panels.png     Figure 5 without ground truth: input, prediction, entropy, depth, std

(the files of the model's tasks). Each PNG states its scale in its text chunks ('Description',
'unit', 'scale'), and DIR/predict.json states it once more, with the method, the checkpoints,
the class names and palette, the settings that shaped the outputs (those of MC Dropout only
for --method mcd), the images written and the files skipped. The class names and
palette travel in the checkpoint (data.checkpoint_meta, written by train.py and distill.py), so a model
trained on NYUv2 or Cityscapes names its classes without the data set at hand; a checkpoint
without them gets class_0 .. class_{K-1} and a fixed palette, with a warning.

Exporting. A single network (SegFormer, DepthFormer, SegDepthFormer, the EMUFormer student)
goes to ONNX with its whole prediction, uncertainty included:

    python predict.py runs/emuformer/best.pt --export onnx      # to out/emuformer_best.onnx
    python predict.py runs/emuformer/best.pt --export onnx --out out/emuformer.onnx

(--out defaults to out/ plus the checkpoint's folder and name, under the git-ignored out/.)

    input   image       (B, 3, H, W) float32, RGB in [0, 1] normalised with data.MEAN / data.STD;
                        H, W >= 29 (batch, height and width are dynamic)
    output  seg_probs   (B, K, H, W) softmax of the upsampled logits (Eq. 1)
            seg_entropy (B, H, W)    nats (Eq. 3)
            depth_mean  (B, H, W)    metres, ReLU (Eq. 4)
            depth_var   (B, H, W)    metres^2, Softplus (Eq. 5)
    (the outputs of the model's tasks), with the classes, palette and units in the file's
    metadata. What is exported is the folded decoder of heads.py (FoldedNetwork), its matrices
    W_i L_i (BatchNorm included: in eval mode it is a fixed affine map) computed once, here, and
    stored as constants, and its sum run by heads.folded_sum, the models' own. The graph is
    traced with PyTorch's TorchScript-based ONNX exporter (deprecated since PyTorch 2.9, still
    in 2.13), which needs nothing beyond PyTorch and one translation of our own (onnx_unflatten)
    to keep height and width dynamic; the newer torch.export-based exporter gives the same graph
    but needs the onnxscript and onnx_ir packages and takes far longer to export
    (docs/results.md). onnx (to write the metadata and check the graph) and onnxruntime are
    optional extras, imported only by the export (and bench.py --onnx and the tests):
    python -m pip install onnx onnxruntime

MC Dropout, Deep Sub-Ensembles and Deep Ensembles are not exported. Dropout is an identity in
an exported inference graph, so MC Dropout's T passes would all be the one network's. A DSE or
a Deep Ensemble is several networks whose outputs are combined (Eq. 3, Eq. 10): each of them
can be exported on its own, member by member, and combined as uq.Summary does. EMUFormer exists
to make that unnecessary: one network that predicts the ensemble's uncertainty.
"""

import argparse
import glob
import inspect
import io
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps, PngImagePlugin

import data
import evaluate
import figures
import heads
import plumbing
import uq
from mit import MIN_SIZE

CHECKPOINT_SUFFIXES = ('.pt', '.pth')


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('paths', nargs='+', metavar='PATH', help='checkpoints (*.pt, *.pth; several = a Deep Ensemble), then '
                                               'images, folders and glob patterns')
    a('--out', help='output folder (required to predict); with --export, the file to write (default: '
                    'out/FOLDER_NAME.onnx for the checkpoint FOLDER/NAME.pt)')
    uq.add_method_options(p)
    a('--size', type=plumbing.positive_int, nargs=2, metavar=('H', 'W'),
      help='resize every image to H x W for the network, and its outputs back (default: each as it is)')
    a('--batch-size', type=plumbing.positive_int, default=1, help='images per uq.predict call (of equal network-input size)')
    a('--precision', default='auto', choices=plumbing.PRECISIONS,
      help='autocast of the forward passes; auto: bf16 (fp16 without bf16) on a GPU, fp32 on a CPU')
    a('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cuda or cpu (default: cuda if there is one)')
    a('--name', help='model name in the pictures; default e.g. "EMUFormer-B2", "SegDepthFormer-B2 (DE x10)"')
    a('--overwrite', action='store_true', help='write into a --out that already holds results')
    a('--export', choices=('onnx',), help='write the single network to --out instead of predicting')
    return p


# ---------------------------------------------------------------------------------------------
# inputs

def list_inputs(args):
    """Image files, folders and glob patterns -> (files in order, without repeats; [(argument,
    why it gave no file)])."""
    files, missing = [], []
    for arg in args:
        paths = [Path(arg)] if Path(arg).exists() else [Path(p) for p in sorted(glob.glob(arg))]
        if not paths:
            missing.append((arg, f'{arg}: no such file or folder, and no file matches it as a pattern'))
        for path in paths:
            if path.is_dir():  # hidden files (.DS_Store, editors' backups) are no one's images
                files += sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith('.'))
            else:
                files.append(path)
    return list(dict.fromkeys(files)), missing


def check_stems(files):
    """The outputs are named after the image's stem: refuse, before any work, two inputs that
    would write the same files."""
    by_stem = {}
    for f in files:
        by_stem.setdefault(f.stem, []).append(str(f))
    clashes = [' and '.join(paths) for paths in by_stem.values() if len(paths) > 1]
    if clashes:
        raise ValueError('these inputs would write the same output files (named after the stem); rename '
                         'one of each, or predict them into different --out folders: ' + '; '.join(clashes))


def read_image(path):
    """An image file -> (H, W, 3) float32 RGB in [0, 1], turned upright as its EXIF orientation
    says (as photos are shown): 8-bit values / 255, 16-bit ones / 65535 (a greyscale image on all
    three channels). ValueError naming the file if it is no image Pillow can read, is broken, has
    32-bit or floating-point pixels, or is smaller than the encoder's minimum."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode.startswith('I;16'):  # 16-bit greyscale; Pillow's convert('RGB') would clip it at 255
                rgb = np.repeat(np.array(im).astype(np.float32)[:, :, None] / 65535, 3, axis=2)
            elif im.mode in ('I', 'F'):
                raise ValueError(f'{im.mode} mode (32-bit integer or floating-point pixels) is not read: '
                                 'convert it to an 8- or 16-bit image')
            else:  # 8 bits per channel (a 16-bit RGB file Pillow reads as 8-bit RGB, its high bytes)
                rgb = np.array(im.convert('RGB')).astype(np.float32) / 255
    except ValueError as e:
        raise ValueError(f'{path}: {e}') from e
    except Exception as e:  # Pillow: OSError, SyntaxError, struct.error, zlib.error... by format
        raise ValueError(f'{path}: not a readable image ({type(e).__name__}: {e})') from e
    if min(rgb.shape[:2]) < MIN_SIZE:
        raise ValueError(f'{path}: {rgb.shape[0]}x{rgb.shape[1]} pixels (HxW), below the encoder\'s '
                         f'minimum of {MIN_SIZE} on each side')
    return rgb


def batches(files, size, batch_size, skipped):
    """Read the files in order and yield (paths, images) batches of equal network-input size
    (`size`, or the image's own): a group is yielded as soon as it has batch_size images, the
    rest at the end. A file that cannot be used is reported at once and appended to
    `skipped` as (path, why)."""
    pending = {}
    for path in files:
        try:
            rgb = read_image(path)
        except ValueError as e:
            print(f'error: {e}; skipped', file=sys.stderr, flush=True)
            skipped.append((str(path), str(e)))
            continue
        key = tuple(size) if size else rgb.shape[:2]
        pending.setdefault(key, []).append((path, rgb))
        if len(pending[key]) == batch_size:
            yield list(zip(*pending.pop(key)))
    for group in pending.values():
        yield list(zip(*group))


def resize(x, size):
    """Bilinear resizing of (B, C, h, w) to size (H, W), antialiased: shrinking averages over
    the pixels that fall into one, as a photo should be shrunk, instead of sampling four."""
    return F.interpolate(x, size=tuple(size), mode='bilinear', align_corners=False, antialias=True)


def to_tensor(rgb):
    """(H, W, 3) float32 in [0, 1] -> the normalised (3, H, W) image the networks take."""
    return data.normalize(torch.from_numpy(rgb).permute(2, 0, 1))


def image_prediction(prediction, i, size):
    """Image i of a batch's Prediction, on the CPU at `size` (H, W), its own: every map is resized
    bilinearly where the network saw another size, so the class map (Prediction.pred) is the
    argmax of the resized probabilities, and the standard deviation the root of the resized
    variance."""
    maps = {}
    for name in ('probs', 'entropy', 'depth_mean', 'depth_var'):
        x = getattr(prediction, name)
        if x is not None:
            x = x[i:i + 1].float()
            if x.shape[-2:] != size:  # a (1, H, W) map is resized as one channel, (1, 1, H, W)
                x = resize(x, size) if x.ndim == 4 else resize(x[:, None], size)[:, 0]
            maps[name] = x.cpu()
    return uq.Prediction(**maps)


# ---------------------------------------------------------------------------------------------
# outputs

def file_formats(tasks, num_classes):
    """{suffix: what the file holds}; the 16-bit PNGs with their 'unit' and 'scale' (unit per
    step of the stored integer). Written into predict.json and into each PNG's text chunks."""
    formats = {}
    if 'seg' in tasks:
        bits = 8 if num_classes <= data.IGNORE_INDEX else 16
        step = math.log(num_classes) / 65535  # the entropy of K classes is at most log K
        formats.update({
            '_seg.png': {'Description': 'palette PNG: the class map in the colours of the palette in predict.json'},
            '_classes.png': {'Description': f'{bits}-bit greyscale PNG: the class id of each pixel, the argmax '
                                            'of the mean softmax'},
            '_entropy.png': {'Description': f'16-bit greyscale PNG: entropy of the mean softmax (Eq. 3); '
                                            f'nats = value * log({num_classes}) / 65535', 'unit': 'nats', 'scale': step},
            '_entropy.npy': {'Description': 'float32 (H, W): entropy of the mean softmax (Eq. 3)', 'unit': 'nats'}})
    if 'depth' in tasks:
        formats.update({
            '_depth.png': {'Description': '16-bit greyscale PNG: mean depth in millimetres, metres = value / '
                                          '1000; saturates: 65535 means 65.535 m or more', 'unit': 'm', 'scale': 0.001},
            '_depth.npy': {'Description': 'float32 (H, W): mean depth', 'unit': 'm'},
            '_depth_std.png': {'Description': '16-bit greyscale PNG: predictive standard deviation of the depth '
                                              '(Eq. 10) in millimetres, metres = value / 1000; saturates: 65535 means '
                                              '65.535 m or more', 'unit': 'm', 'scale': 0.001},
            '_depth_std.npy': {'Description': 'float32 (H, W): predictive standard deviation of the depth (Eq. 10)',
                               'unit': 'm'}})
    formats['_panels.png'] = {'Description': 'Figure-5-like panels: input, prediction, uncertainty'}
    return formats


def quantize(values, scale):
    """Float values -> uint16 steps of `scale`, rounded to the nearest, saturating at 65535."""
    return np.clip(np.rint(values.astype(np.float64) / scale), 0, 65535).astype(np.uint16)


def save_png(path, image, text):
    """A PIL image as a PNG, atomically, with `text` ({key: value}) in its text chunks."""
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, str(value))
    plumbing.save_atomic(path, lambda f: image.save(f, format='PNG', pnginfo=info))


def save_npy(path, array):
    plumbing.save_atomic(path, lambda f: np.save(f, array))


def class_names(model, path):
    """The class names and the palette (K, 3) that the checkpoint at `path` carries
    (data.checkpoint_meta), or, with a warning, class_0 .. class_{K-1} in a fixed palette."""
    if 'classes' in model.meta and 'palette' in model.meta:
        return list(model.meta['classes']), np.array(model.meta['palette'], np.uint8)
    print(f'warning: {path} carries no class names and palette; naming the classes class_0 .. '
          f'class_{model.num_classes - 1}, in a fixed palette', file=sys.stderr)
    names = [f'class_{k}' for k in range(model.num_classes)]
    return names, data._voc_palette(model.num_classes + 1)[1:]  # VOC's colours, without its black


@dataclass
class Writer:
    """Writes every output of one image into `folder` (the module docstring's list)."""
    folder: Path
    name: str                     # the model's name in the pictures
    formats: dict
    classes: list = None          # the model's class names and palette (K, 3), None without segmentation
    palette: np.ndarray = None

    def write(self, path, image, prediction):
        """path: the input file (its stem names the outputs); image: its normalised (3, H, W)
        tensor; prediction: its uq.Prediction at (H, W) on the CPU. Returns the names of the files written."""
        out = lambda suffix: self.folder / f'{path.stem}{suffix}'
        text = lambda suffix: {'Software': 'emuformer predict.py', 'Model': self.name, **self.formats[suffix]}
        legend = []
        if prediction.probs is not None:
            ids = prediction.pred[0].numpy()
            if len(self.palette) <= 256:  # a PNG palette has at most 256 entries; beyond, RGB colours
                seg = Image.fromarray(ids.astype(np.uint8))
                seg.putpalette(self.palette.astype(np.uint8).tobytes())  # makes it mode 'P'
            else:
                seg = Image.fromarray(self.palette[ids].astype(np.uint8))
            save_png(out('_seg.png'), seg, text('_seg.png'))
            classes = ids.astype(np.uint8 if len(self.classes) <= data.IGNORE_INDEX else np.uint16)
            save_png(out('_classes.png'), Image.fromarray(classes), text('_classes.png'))
            entropy = prediction.entropy[0].numpy()
            save_png(out('_entropy.png'), Image.fromarray(quantize(entropy, self.formats['_entropy.png']['scale'])),
                     text('_entropy.png'))
            save_npy(out('_entropy.npy'), entropy)
            legend = figures.class_legend(ids, self.palette, self.classes)
        if prediction.depth_mean is not None:
            depth, std = prediction.depth_mean[0].numpy(), prediction.depth_var[0].sqrt().numpy()
            save_png(out('_depth.png'), Image.fromarray(quantize(depth, 0.001)), text('_depth.png'))
            save_npy(out('_depth.npy'), depth)
            save_png(out('_depth_std.png'), Image.fromarray(quantize(std, 0.001)), text('_depth_std.png'))
            save_npy(out('_depth_std.npy'), std)
        rows = figures.prediction_panels(image[None], prediction, 0, self.palette, len(self.classes or ()))
        figures.save_figure(out('_panels.png'), rows, f'{self.name} on {path.name}', legend)
        return [out(suffix).name for suffix in self.formats]


# ---------------------------------------------------------------------------------------------
# predicting

def predict_files(model, method, files, args, writer, device):
    """Every file through uq.predict, its outputs written by `writer` -> (images written as
    manifest entries, [(path, why skipped)])."""
    kwargs = {k: getattr(args, k) for k in uq.METHOD_OPTIONS.get(method, ())}
    dtype = plumbing.autocast_dtype(args.precision, device)
    progress = plumbing.Progress('predicted', len(files))
    written, skipped = [], []
    for paths, rgbs in batches(files, args.size, args.batch_size, skipped):
        images = [to_tensor(rgb) for rgb in rgbs]
        x = torch.stack([image if args.size is None else resize(image[None], args.size)[0] for image in images])
        with plumbing.autocast(device, dtype):
            prediction = uq.predict(model, x.to(device), method, **kwargs)
        for i, (path, image) in enumerate(zip(paths, images)):
            names = writer.write(path, image, image_prediction(prediction, i, image.shape[-2:]))
            written.append({'input': str(path), 'height': image.shape[1], 'width': image.shape[2], 'files': names})
        progress.update(len(written) + len(skipped))
    return written, skipped


def settings(args, method):
    """The settings that shaped the outputs, for predict.json: a sampling method's only with it."""
    chosen = {'size': args.size, 'batch_size': args.batch_size, 'precision': args.precision, 'device': args.device}
    if method in uq.METHOD_OPTIONS:
        chosen.update({k: getattr(args, k) for k in uq.METHOD_OPTIONS[method]}, seed=args.seed)
    return chosen


def main(argv=None):
    """Predict (or export); returns the exit status: 0, or 1 if a file was skipped."""
    args = get_parser().parse_args(argv)
    checkpoints = [p for p in args.paths if p.endswith(CHECKPOINT_SUFFIXES)]
    inputs = [p for p in args.paths if not p.endswith(CHECKPOINT_SUFFIXES)]
    if not checkpoints:
        raise ValueError('no checkpoint: the positional arguments ending in .pt or .pth are the checkpoints')
    if args.export:
        if inputs:
            raise ValueError(f'--export writes the network alone; leave out the inputs ({", ".join(inputs)})')
        return export(args, checkpoints)
    if not inputs:
        raise ValueError('no inputs: give image files, folders or glob patterns after the checkpoint(s)')
    if args.out is None:
        raise ValueError('--out: give the folder to write the outputs into, e.g. --out out/photos')
    if args.size and min(args.size) < MIN_SIZE:
        raise ValueError(f'--size {args.size[0]} {args.size[1]}: the encoder needs at least {MIN_SIZE} on each side')
    if args.batch_size < 1:
        raise ValueError(f'--batch-size {args.batch_size}: must be at least 1')
    if args.samples < 1:
        raise ValueError(f'--samples {args.samples}: must be at least 1')
    if not 0 <= args.dropout < 1:
        raise ValueError(f'--dropout {args.dropout}: must be in [0, 1)')
    models = heads.load_members(checkpoints)  # before --out is made: a bad checkpoint leaves no folder
    method = evaluate.resolve_method(args.method, models, checkpoints)
    files, missing = list_inputs(inputs)
    if not files:
        raise ValueError('; '.join(why for _, why in missing) or f'no files in {", ".join(inputs)}')
    check_stems(files)
    plumbing.check_output(args.out, '--out', args.overwrite, folder=True)
    for _, why in missing:
        print(f'error: {why}', file=sys.stderr)

    first = models[0]
    classes, palette = class_names(first, checkpoints[0]) if 'seg' in first.tasks else (None, None)
    name = args.name or evaluate.default_name(models, method, args.dropout)
    formats = file_formats(first.tasks, first.num_classes)
    device = torch.device(args.device)
    models = [m.to(device) for m in models]
    model = uq.DeepEnsemble(models) if method == 'de' else models[0]
    torch.manual_seed(args.seed)  # the sampling methods' masks: the same outputs on every run
    print(f'{name}: {len(files)} file(s), method {method}, on {device}', flush=True)

    writer = Writer(Path(args.out), name, formats, classes, palette)
    written, skipped = predict_files(model, method, files, args, writer, device)
    skipped = missing + skipped
    if written:
        plumbing.write_json({
            'name': name, 'method': method, 'checkpoints': checkpoints, 'settings': settings(args, method),
            'tasks': list(first.tasks), 'classes': classes, 'palette': None if palette is None else palette.tolist(),
            'files': formats, 'images': written,
            'skipped': [{'input': path, 'error': why} for path, why in skipped]}, Path(args.out) / 'predict.json')
        print(f'wrote the outputs of {len(written)} image(s) to {args.out}', flush=True)
    else:  # no predict.json either: --out stays empty, free for the next run
        print(f'wrote nothing to {args.out}: no input could be read', file=sys.stderr)
    if skipped:
        print(f'skipped {len(skipped)}:\n' + '\n'.join(f'  {why}' for _, why in skipped), file=sys.stderr)
    return 1 if skipped else 0


# ---------------------------------------------------------------------------------------------
# export

OUTPUT_NAMES = {'seg': ('seg_probs', 'seg_entropy'), 'depth': ('depth_mean', 'depth_var')}
PREDICTION_FIELDS = {'seg_probs': 'probs', 'seg_entropy': 'entropy', 'depth_mean': 'depth_mean',
                     'depth_var': 'depth_var'}  # the uq.Prediction field of each graph output
NOT_EXPORTED = {
    'mcd': 'MC Dropout is not exported: dropout is an identity in an exported inference graph, so its '
           'passes would all be the one network; export the network (method none) or predict with '
           'predict.py --method mcd',
    'mcd-decoder': 'decoder MC Dropout is not exported, for the reason MC Dropout is not: export the network '
                   '(method none) or predict with predict.py --method mcd-decoder',
    'drop-path': 'test-time drop-path is not exported: stochastic depth is an identity in an exported inference '
                 'graph; export the network (method none) or predict with predict.py --method drop-path',
    'dse': 'a Deep Sub-Ensemble is not exported: it is N heads whose outputs are combined (Eq. 3, Eq. 10); '
           'each head with the shared encoder could be exported member by member, which predict.py does '
           'not do; predict with predict.py instead',
    'de': 'a Deep Ensemble is not exported as one graph: export each member on its own (one checkpoint per '
          'call) and combine their outputs with Eq. 3 and Eq. 10, as uq.Summary does',
}
OPSET = 17  # LayerNormalization is an ONNX operator from opset 17 on


# True: FoldedNetwork's decoder makes and uses the fused map CHUNK channels at a time
# (chunked_heads, at the end of this file); bench.py's row onnx-plain-decoder sets it False to
# time the plain form
FAST_DECODER = True
CHUNK = 128  # channels; 96 to 192 ran alike in onnxruntime (docs/results.md)
# True: the softmax and entropy go over the classes of pixel rows (softmax_and_entropy_rows, at
# the end of this file); bench.py's row onnx-plain-outputs sets it False to time the plain form
FAST_OUTPUTS = True
# True: onnx_bytes writes a flatten's target shape as constants where the sizes after the
# flattened ones are known (onnx_flatten, at the end of this file); bench.py's row
# onnx-plain-flatten sets it False to time the exporter's own
FAST_FLATTEN = True
# True: onnx_session's threads spin between the operators of a run, and stop when it returns;
# bench.py's row onnx-plain-threads sets it False: they sleep whenever they have no work
FAST_THREADS = True


class FoldedNetwork(nn.Module):
    """A SegFormer, DepthFormer or SegDepthFormer as it is exported: image in, the prediction
    with its uncertainty out (the module docstring's outputs, in that order), through the fold
    of heads.py (heads.folded_sum, the models' own) with its matrices computed once, here, as
    constants:

        z = sum_i up(M_i f_i) + c      M_i: the heads' W_i L_i stacked, BatchNorm folded in
        y = up(P ReLU(z))              P: each head's 1x1 prediction layer on its E channels
        softmax and entropy (Eq. 1, 3), or ReLU and Softplus (Eq. 4, 5)

    The decoder's dropout is an identity in eval mode and is left out."""

    def __init__(self, model):
        super().__init__()
        model.eval()  # fold() then folds BatchNorm's running statistics into the matrices
        self.backbone, self.tasks = model.backbone, model.tasks
        decoders = [model.decode_head if t == 'seg' else model.depth_head for t in self.tasks]
        self.predictors = nn.ModuleList(d.linear_pred for d in decoders)
        with torch.no_grad():
            weights, bias = heads.stacked_folds(decoders)
            for i, weight in enumerate(weights):  # (G*E, C_i)
                self.register_buffer(f'stage{i + 1}', weight)
            self.register_buffer('bias', bias)  # (G*E,)
        self.output_names = [name for t in self.tasks for name in OUTPUT_NAMES[t]]

    def forward(self, x):
        features = self.backbone(x)  # [(B, C_i, H / 2^(i+1), W / 2^(i+1))]
        weights = [getattr(self, f'stage{i + 1}') for i in range(4)]
        if FAST_DECODER:  # the speed-up at the end of this file: the same, CHUNK channels at a time
            low = chunked_heads(features, weights, self.bias, self.predictors)
        else:
            z = F.relu(heads.folded_sum(features, weights, self.bias))  # (B, G*E, H/4, W/4)
            # each head's prediction layer on its own E channels of z
            low = [heads.pointwise(z_g, p.weight, p.bias) for p, z_g in zip(self.predictors, z.chunk(len(self.tasks), dim=1))]
        outputs = []
        for task, y in zip(self.tasks, low):  # y: (B, K_t, H/4, W/4)
            y = F.interpolate(y, x.shape[-2:], mode='bilinear', align_corners=False)
            if task == 'depth':
                outputs += [F.relu(y[:, 0]), F.softplus(y[:, 1])]
            elif FAST_OUTPUTS:  # the speed-up at the end of this file: the same, over pixel rows
                outputs += softmax_and_entropy_rows(y)
            else:
                outputs += softmax_and_entropy(y)
        return tuple(outputs)


def softmax_and_entropy(y):
    """Logits y (B, K, H, W) -> [p, H]: the softmax over dim 1 and its entropy (Eq. 1, Eq. 3),
    with one Exp of the logits. With d = y - max_c y_c and s = sum_c exp(d_c):

        p_c = exp(d_c) / s        H = -sum_c p_c log p_c = log s - sum_c p_c d_c

    which is finite where a p_c underflows to 0, and never negative (d <= 0 <= log s). It is
    written out with reductions over dim 1 rather than as ONNX's Softmax and LogSoftmax over
    dim 1, whose onnxruntime CPU kernels would transpose the full-resolution logits to their
    last axis first. softmax_and_entropy_rows, the speed-up at the end of this file, takes
    those over rows of pixels instead, whose last axis is the classes (bench.py's row
    onnx-plain-outputs times this plain form)."""
    d = y - y.amax(dim=1, keepdim=True)
    e = d.exp()
    s = e.sum(dim=1, keepdim=True)
    p = e / s
    return [p, s.log().squeeze(1) - (p * d).sum(dim=1)]


def onnx_unflatten(g, x, dim, sizes):
    """x.unflatten(dim, sizes) in ONNX: a Reshape to x's shape with dimension `dim` replaced by
    `sizes`. PyTorch's own translation computes the axis in the graph (Add, Mod), after which
    the exporter's shape inference falls back to the traced example's shapes and writes the
    token maps' sizes from stage 2 on as constants: the graph then fails on any other size.
    Here the axis is a constant (mit.py unflattens with dim >= 0), and H and W stay dynamic."""
    dim = int(dim.node().t('value'))
    shape = g.op('Shape', x)
    const = lambda v: g.op('Constant', value_t=torch.tensor([v], dtype=torch.int64))
    head, tail = g.op('Slice', shape, const(0), const(dim)), g.op('Slice', shape, const(dim + 1), const(2**62))
    return g.op('Reshape', x, g.op('Concat', head, sizes, tail, axis_i=0))


# the TorchScript-based exporter, the one every torch >= 2.3 has; torch 2.5 added the `dynamo`
# flag, and from 2.9 on it defaults to the other exporter, so ask for this one where it is a flag
TORCHSCRIPT_EXPORTER = {'dynamo': False} if 'dynamo' in inspect.signature(torch.onnx.export).parameters else {}


def onnx_bytes(network, metadata):
    """The FoldedNetwork as an ONNX model (bytes) with dynamic batch, height and width, and
    `metadata` ({key: str}) in its metadata_props (onnxruntime: get_modelmeta())."""
    try:
        import onnx  # an optional extra: only the export needs it
    except ImportError:
        raise SystemExit('--export onnx needs the optional package onnx: python -m pip install onnx') from None
    dynamic = {'image': {0: 'batch', 2: 'height', 3: 'width'}}
    for name in network.output_names:
        dynamic[name] = {0: 'batch', 2: 'height', 3: 'width'} if name == 'seg_probs' else {0: 'batch', 1: 'height', 2: 'width'}
    buffer = io.BytesIO()
    symbolics = {'aten::unflatten': onnx_unflatten}
    if FAST_FLATTEN:  # the speed-up at the end of this file
        symbolics['aten::flatten'] = onnx_flatten
    for op, symbolic in symbolics.items():
        torch.onnx.register_custom_op_symbolic(op, symbolic, OPSET)
    try:
        with warnings.catch_warnings():
            # tracing records the encoder's size check as a constant (the graph keeps no Python
            # `if`), and the TorchScript-based exporter announces its deprecation: only noise
            warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
            warnings.filterwarnings('ignore', category=DeprecationWarning)
            torch.onnx.export(network.eval(), (torch.zeros(2, 3, 64, 96),), buffer, input_names=['image'],
                              output_names=network.output_names, dynamic_axes=dynamic, opset_version=OPSET,
                              **TORCHSCRIPT_EXPORTER)
    finally:
        for op in symbolics:
            torch.onnx.unregister_custom_op_symbolic(op, OPSET)
    model = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(model, metadata)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def export_path(checkpoint):
    """--export's default --out: out/FOLDER_NAME.onnx for the checkpoint FOLDER/NAME.pt, under
    the git-ignored out/ folder (runs/emuformer/best.pt -> out/emuformer_best.onnx)."""
    path = Path(checkpoint).resolve()
    return str(Path('out') / f'{path.parent.name}_{path.stem}.onnx')


def export(args, checkpoints):
    """--export onnx: the single network of the checkpoint, folded, to --out."""
    models = heads.load_members(checkpoints)  # before --out's folder is made: a bad checkpoint leaves none
    method = evaluate.resolve_method(args.method, models, checkpoints)
    if method != 'none':
        raise ValueError(NOT_EXPORTED[method])
    out = args.out or export_path(checkpoints[0])
    plumbing.check_output(out, '--out', args.overwrite)
    model = models[0]
    network = FoldedNetwork(model)
    metadata = {'name': args.name or evaluate.default_name(models, method, args.dropout),
                'input': 'image (B, 3, H, W) float32: RGB in [0, 1], normalised as (rgb - mean) / std with '
                         f'mean {list(data.MEAN)}, std {list(data.STD)}; H, W >= {MIN_SIZE}',
                'outputs': 'seg_probs (B, K, H, W) softmax; seg_entropy (B, H, W) nats; depth_mean (B, H, W) '
                           'metres; depth_var (B, H, W) metres^2 (those of the model\'s tasks)'}
    if 'seg' in model.tasks:
        classes, palette = class_names(model, checkpoints[0])
        metadata.update(classes=json.dumps(classes), palette=json.dumps(palette.tolist()))
    content = onnx_bytes(network, metadata)
    plumbing.save_atomic(out, lambda f: f.write(content))
    print(f"wrote {out}: {metadata['name']}, outputs {', '.join(network.output_names)}")
    differences = parity(out, model)
    if differences is None:
        print('not checked against PyTorch: that needs onnxruntime (python -m pip install onnxruntime)')
    else:
        print('parity, max |onnxruntime - PyTorch| / max |PyTorch| over images of 96x128 and 77x101: ' +
              ', '.join(f'{name} {d:.1e}' for name, d in differences.items()))
    return 0


def parity(path, model, sizes=((96, 128), (77, 101))):
    """The exported file at `path` in onnxruntime against the PyTorch model (uq.predict, method
    none) on random images of `sizes` (the second with sides that are not multiples of 32, so that
    the maps' sizes are rounded up at every stage) -> {output: max |onnx - torch| / max |torch|,
    the worst over the sizes}, or None without onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnx_session(onnxruntime, str(path))
    generator = torch.Generator().manual_seed(0)
    worst = {}
    for size in sizes:
        x = torch.randn(1, 3, *size, generator=generator)
        pred = uq.predict(model.eval(), x, 'none')
        for output, theirs in zip(session.get_outputs(), session.run(None, {'image': x.numpy()})):
            ours = getattr(pred, PREDICTION_FIELDS[output.name]).numpy()
            difference = float(np.abs(theirs - ours).max() / np.abs(ours).max())
            worst[output.name] = max(worst.get(output.name, 0.0), difference)
    return worst


def onnx_session(onnxruntime, source, threads=None, arena=True):
    """An onnxruntime CPU session of an exported file (`source`: a path, or its bytes), as predict.py and
    bench.py make it: every graph optimisation on (ORT_ENABLE_ALL: constant folding, node
    fusions, the CPU's own memory layouts) and `threads` intra-op threads (None: onnxruntime's
    choice, one per physical core). Between two operators of a run the threads spin on their
    cores (onnxruntime's default), which saves waking them for each of the graph's operators;
    when the run returns they stop (session.force_spinning_stop; by default they spin on for
    a while, which would slow whatever the process does next: reading the next image, in
    bench.py the next row). With FAST_THREADS off they sleep whenever they have no work
    (bench.py's row onnx-plain-threads). arena=False gives up onnxruntime's memory cache
    (bench.py's peak column, which is measured with nothing kept, cpu_peak_memory)."""
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry('session.intra_op.allow_spinning', '1' if FAST_THREADS else '0')
    options.add_session_config_entry('session.force_spinning_stop', '1')
    if threads:
        options.intra_op_num_threads = threads
    options.enable_cpu_mem_arena = arena
    return onnxruntime.InferenceSession(source, options, providers=['CPUExecutionProvider'])


# ---------------------------------------------------------------------------------------------
# --- speed-up: the fused map in chunks of channels (replaces the whole map in
# FoldedNetwork.forward; bench.py rows onnx and onnx-plain-decoder, timed in the same run;
# docs/results.md)

def chunked_heads(features, weights, bias, predictors):
    """FoldedNetwork's plain decoder, [each head's (B, K_t, H/4, W/4) output], with each head's
    part of the fused map z made and used CHUNK channels at a time. Each channel of z is a sum
    of its own rows of the stacked matrices M_i (and of c), and a head's prediction layer sums
    over its channels, so

        y_t = sum over chunks k of P_t[:, k] ReLU(z_k) + b_t,   z_k = heads.folded_sum with the rows k

    the same arithmetic in another order. onnxruntime writes every sum and the ReLU of z to a new
    map; a chunk's maps are CHUNK / (G*E) of the whole (a twelfth in SegDepthFormer-B2), so each
    of those passes reads maps just written, which are likelier to be still in the processor's
    cache. folded_sum upsamples and concatenates stage 2 with stage 1 for every chunk alike, which
    the exporter's elimination of common subexpressions writes into the graph once (run in
    PyTorch, as the tests do, they are computed for every chunk)."""
    E = predictors[0].in_channels  # each head's channels in the stacked matrices
    low = []
    for g, predictor in enumerate(predictors):
        parts = []
        for start in range(0, E, CHUNK):
            rows = slice(g * E + start, g * E + min(start + CHUNK, E))
            z = F.relu(heads.folded_sum(features, [w[rows] for w in weights], bias[rows]))
            parts.append(heads.pointwise(z, predictor.weight[:, start:start + CHUNK]))
        low.append(sum(parts, predictor.bias.view(-1, 1, 1)))  # b_t + the chunks' products
    return low


# ---------------------------------------------------------------------------------------------
# --- speed-up: the softmax and entropy over pixel rows (replaces softmax_and_entropy in
# FoldedNetwork.forward; bench.py rows onnx and onnx-plain-outputs, timed in the same run;
# docs/results.md)

def softmax_and_entropy_rows(y):
    """softmax_and_entropy(y) computed on the (B, H*W, K) rows of pixels, each row a pixel's K
    logits next to each other, in the layout the heads' products leave (channels last):

        p = softmax(rows)        H = -sum_c p_c log_softmax(rows)_c

    onnxruntime runs Softmax and LogSoftmax over a last axis as one kernel each, which finds a
    row's maximum, sums its exponentials and writes the row while it is in the cache. Two such
    kernels take less time than one Exp with the elementwise passes around it over the whole
    map (bench.py's row onnx-plain-outputs), though between them they compute the exponentials
    twice.
    H is finite where a p_c underflows to 0 (log_softmax is finite there) and never negative (each
    p_c log_softmax_c <= 0). onnxruntime also upsamples a channels-last map faster. Its layout
    optimiser would otherwise move the layout change from the probabilities back in front of
    the upsampling, where it moves fewer values but leaves the slow forms; the Reshape to rows
    is an operator it does not move layout changes through."""
    H, W = y.shape[-2:]
    rows = y.permute(0, 2, 3, 1).flatten(1, 2)  # (B, H*W, K)
    p = rows.softmax(dim=-1)
    entropy = -(p * rows.log_softmax(dim=-1)).sum(dim=-1)
    return [p.unflatten(1, (H, W)).permute(0, 3, 1, 2), entropy.unflatten(1, (H, W))]


# ---------------------------------------------------------------------------------------------
# --- speed-up: flatten with a constant target shape (replaces the exporter's own translation
# in onnx_bytes; bench.py rows onnx and onnx-plain-flatten, timed in the same run; docs/results.md)

def onnx_flatten(g, x, start_dim, end_dim):
    """x.flatten(start_dim, end_dim) in ONNX: a Reshape to [0, .., 0, -1, sizes after end_dim],
    where 0 keeps that dimension of x (ONNX's Reshape) and the sizes after end_dim are the
    constants the exporter knows them to be (mit.map_to_tokens: the channels). PyTorch's own
    translation reads x's shape in the graph. After each of the encoder's convs that x is the
    conv's output, and onnxruntime keeps a conv's output in its blocked layout, so it copies
    the whole map back out of that layout only to read its shape. Where a size after end_dim
    is not known as a positive constant (ONNX's Reshape reads a 0 as "keep"), or x's rank is
    not known, this is PyTorch's own translation. A size the exporter took for a constant where
    it varies would show at another input size: the export is checked at two (parity)."""
    sizes = x.type().varyingSizes()  # None where a size is not a constant; None for an unknown rank
    if sizes:
        start, end = (int(dim.node().t('value')) % len(sizes) for dim in (start_dim, end_dim))
        tail = sizes[end + 1:]
        if all(isinstance(size, int) and size > 0 for size in tail):
            target = torch.tensor([0] * start + [-1] + tail, dtype=torch.int64)
            return g.op('Reshape', x, g.op('Constant', value_t=target))
    from torch.onnx import symbolic_opset11  # the exporter's own translations: only an export needs them
    return symbolic_opset11.flatten(g, x, start_dim, end_dim)


if __name__ == '__main__':
    plumbing.entry_point(main)
