"""
Data for joint semantic segmentation and monocular depth estimation: NYUv2, Cityscapes and a
synthetic set of rendered rooms, all returning the same kind of sample, plus the paper's
augmentations (Section 4) and the colour jitter on the teacher's input (Section 3.3).

A sample is a dict of tensors:
    'image'          float32 (3, H, W)  RGB in [0, 1], then normalised with ImageNet MEAN / STD
    'label'          int64   (H, W)     class ids 0..K-1, IGNORE_INDEX (255) = unlabelled
    'depth'          float32 (H, W)     metres, 0 = no measurement (valid_depth says which count)
    'name'           str
    'image_teacher'  float32 (3, H, W)  only with teacher_jitter: the same crop, scale and flip
                                        as 'image' but colour-jittered (EMUFormer's teacher input)
    'ood'            bool    (H, W)     only for evaluation data that marks them: pixels of objects
                                        of no training class (their label is IGNORE_INDEX and their
                                        depth 0 as well, so the in-distribution metrics leave them
                                        out; evaluate.py detects them by the uncertainty)

On-disk layouts:
    NYUv2 (40 classes, 795 train / 654 val), the "NYUD-MT" layout of MTI-Net, ATRC and InvPT:
        ROOT/images/<name>.jpg
        ROOT/segmentation/<name>.png    0 = unlabelled, 1..40 = classes (uint8 or uint16)
        ROOT/depth/<name>.npy           float metres, 0 = invalid
        ROOT/gt_sets/{train,val}.txt    one <name> per line
        ROOT/ood/<name>.png             optional: nonzero = out-of-distribution pixel
    made from the official files by
        pip install h5py scipy
        python data.py convert-nyuv2 --mat nyu_depth_v2_labeled.mat --splits splits.mat \\
            --mapping classMapping40.mat --out data/nyuv2
    Cityscapes (19 classes, 2975 train / 500 val), the official layout:
        ROOT/leftImg8bit/{split}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
        ROOT/gtFine/{split}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
        ROOT/disparity/{split}/<city>/<city>_<seq>_<frame>_disparity.png
        ROOT/camera/{split}/<city>/<city>_<seq>_<frame>_camera.json
        ROOT/ood/{split}/<city>/<city>_<seq>_<frame>_ood.png   optional: nonzero = out of distribution
    Synthetic (6 classes, scenes.py): no files, every scene is drawn on the fly from (seed,
    index); with ood=True each scene also has one or two objects of a kind never drawn in
    training. As image files, for tools that read images: python scenes.py --help

A data set with an `ood` folder in its split gives every sample an 'ood' mask, read from the
one-channel PNG of the sample (any nonzero value marks an out-of-distribution pixel): an
anomaly benchmark in either layout plugs into evaluate.py's OOD metrics that way.

Two conventions hold for every data set and are defined once for the whole project:
IGNORE_INDEX marks a pixel without a class (defined in scenes.py, which this file imports, so
that the scenes' annotator can use it too), and valid_depth, here, says which ground-truth
depths are measurements. Depth beyond a data set's MAX_DEPTH (the --max-depth of train.py and evaluate.py)
is made invalid when a sample is read, so no loss and no metric ever sees it.

Use build_dataset(name, root, split, train) to get any of them with the right transform.
"""

import argparse
import json
import math
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from corrupt import CORRUPTIONS, corrupt
from mit import MIN_SIZE
from plumbing import entry_point, positive_int, save_atomic
from scenes import IGNORE_INDEX, SEED_OFFSET, SYNTHETIC_CLASSES, SYNTHETIC_PALETTE, SyntheticScenes

def valid_depth(depth):
    """Which ground-truth depths count (numpy arrays and torch tensors alike): a measurement is
    > 0 and finite. Missing depth is stored as 0 (no stereo match, no Kinect return); NaN and inf
    compare false with everything, so they are invalid too."""
    return (depth > 0) & (depth < math.inf)


MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics of RGB in [0, 1]: the encoder was pre-trained on them
STD = (0.229, 0.224, 0.225)

# -----------------------------------------------------------------------------
# class names and palettes (palette[k] is the RGB colour of class k, for visualisation)


def _voc_palette(n):
    """The PASCAL VOC colour map: the low bits of index i go to the high bits of R, G and B
    in turn, so that neighbouring indices get clearly different colours."""
    palette = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c = i
        for bit in range(7, -1, -1):
            for channel in range(3):
                palette[i, channel] |= ((c >> channel) & 1) << bit
            c >>= 3
    return palette


# The 40 classes of Gupta et al. (classMapping40.mat), in the order of their ids 1..40.
NYUV2_CLASSES = (
    'wall', 'floor', 'cabinet', 'bed', 'chair', 'sofa', 'table', 'door', 'window', 'bookshelf',
    'picture', 'counter', 'blinds', 'desk', 'shelves', 'curtain', 'dresser', 'pillow', 'mirror',
    'floor mat', 'clothes', 'ceiling', 'books', 'refrigerator', 'television', 'paper', 'towel',
    'shower curtain', 'box', 'whiteboard', 'person', 'night stand', 'toilet', 'sink', 'lamp',
    'bathtub', 'bag', 'otherstructure', 'otherfurniture', 'otherprop')
NYUV2_PALETTE = _voc_palette(41)[1:]  # skip VOC's black, which stays free for ignored pixels

CITYSCAPES_CLASSES = (
    'road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light', 'traffic sign',
    'vegetation', 'terrain', 'sky', 'person', 'rider', 'car', 'truck', 'bus', 'train',
    'motorcycle', 'bicycle')
CITYSCAPES_PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32)], np.uint8)
# label id -> train id for the 34 ids of gtFine_labelIds.png (cityscapesScripts' labels.py);
# every id that is not one of the 19 evaluated classes becomes IGNORE_INDEX.
CITYSCAPES_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
_CITYSCAPES_TRAIN_ID = np.full(256, IGNORE_INDEX, np.int64)
_CITYSCAPES_TRAIN_ID[list(CITYSCAPES_LABEL_IDS)] = np.arange(19)

NUM_CLASSES = {'nyuv2': 40, 'cityscapes': 19, 'synthetic': len(SYNTHETIC_CLASSES)}
CLASS_NAMES = {'nyuv2': NYUV2_CLASSES, 'cityscapes': CITYSCAPES_CLASSES, 'synthetic': SYNTHETIC_CLASSES}
PALETTES = {'nyuv2': NYUV2_PALETTE, 'cityscapes': CITYSCAPES_PALETTE, 'synthetic': SYNTHETIC_PALETTE}
CROP_SIZES = {'nyuv2': (480, 640), 'cityscapes': (768, 768)}  # paper Section 4, (H, W)
# The farthest depth that counts, in metres (the paper gives none). NYUv2: the Kinect measures
# up to about 10 m, the usual evaluation cap. Cityscapes: stereo depth error grows with the
# square of the distance (a disparity of 1/256 pixel, the PNG's step, is ~120 km); 80 m, the
# cap of the usual driving-scene depth evaluations, keeps the measurements that mean something.
# Synthetic: the back wall of a room is at most 9 m away.
MAX_DEPTH = {'nyuv2': 10.0, 'cityscapes': 80.0, 'synthetic': 10.0}
# brightness, contrast, saturation, hue of the teacher's input: the paper gives none; these are
# the strengths of MoCo v2's colour jitter (torchvision's ColorJitter defaults to no jitter)
TEACHER_JITTER = (0.4, 0.4, 0.4, 0.1)


def checkpoint_meta(name, **extra):
    """What a checkpoint carries about its data set: the class names and their palette, so
    that a model labels its output without the data set at hand (plus `extra`)."""
    return {'data': name, 'classes': list(CLASS_NAMES[name]), 'palette': PALETTES[name].tolist(), **extra}

# -----------------------------------------------------------------------------
# augmentations


def normalize(image):
    """(3, H, W) RGB in [0, 1] -> ImageNet-normalised; the padding value 0 of random crops is
    therefore the mean colour, the most neutral input the pre-trained encoder knows."""
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (image - mean) / std


def random_scale(image, label, depth, scale):
    """Resize by a factor drawn uniformly from scale = (low, high): bilinear for the image,
    nearest for label and depth, which must not invent classes or blend a depth edge (or a
    hole, 0) into values that were never measured. Depth values stay as they are: the scale is
    an augmentation of the image, not a move of the camera."""
    s = scale[0] + (scale[1] - scale[0]) * torch.rand(()).item()
    h, w = label.shape
    size = (max(1, round(h * s)), max(1, round(w * s)))
    image = F.interpolate(image[None], size, mode='bilinear', align_corners=False)[0]
    # 'nearest-exact' samples at pixel centres like bilinear with align_corners=False, so label
    # and depth stay aligned with the image; plain 'nearest' is shifted by half a pixel.
    label_depth = torch.stack([label.float(), depth])[None]  # (1, 2, H, W); ids <= 255 are exact in float32
    label_depth = F.interpolate(label_depth, size, mode='nearest-exact')[0]
    return image, label_depth[0].long(), label_depth[1]


def random_crop(image, label, depth, size):
    """Cut a random window of size (H, W); where the image is smaller the window is the whole
    image along that side (JointTransform pads it afterwards)."""
    h, w = label.shape
    y = torch.randint(max(h - size[0], 0) + 1, ()).item()
    x = torch.randint(max(w - size[1], 0) + 1, ()).item()
    window = (slice(y, y + size[0]), slice(x, x + size[1]))
    return image[(slice(None), *window)], label[window], depth[window]


def _gray(image):
    """(3, H, W) RGB -> (1, H, W) luma with the ITU-R 601 weights."""
    return (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2])[None]


# RGB <-> YIQ: Y is the luma, (I, Q) the chroma plane; rotating (I, Q) shifts the hue
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def color_jitter(image, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1):
    """Random colour change of a (3, H, W) RGB image in [0, 1], like torchvision's ColorJitter
    with a fixed order: brightness, contrast and saturation factors are drawn from
    [1 - s, 1 + s], the hue shift from [-hue, hue] of a full turn (a rotation of the chroma
    plane in YIQ space, close to a shift of the HSV hue). Draws from the global torch RNG."""
    b, c, s = (1 + k * (2 * torch.rand(()).item() - 1) for k in (brightness, contrast, saturation))
    angle = 2 * math.pi * hue * (2 * torch.rand(()).item() - 1)
    image = (image * b).clamp(0, 1)
    gray = _gray(image).mean()
    image = (gray + c * (image - gray)).clamp(0, 1)  # contrast: away from the mean luma
    gray = _gray(image)
    image = (gray + s * (image - gray)).clamp(0, 1)  # saturation: away from the pixel's own gray
    cos, sin = math.cos(angle), math.sin(angle)
    rotate = torch.tensor([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
    matrix = _YIQ_TO_RGB @ rotate @ _RGB_TO_YIQ
    return torch.einsum('ij,jhw->ihw', matrix, image).clamp(0, 1)


def _pad_to(x, size, value):
    """Pad the last two dims of x at the bottom and right up to size (no-op if already there)."""
    return F.pad(x, (0, size[1] - x.shape[-1], 0, size[0] - x.shape[-2]), value=value)


class JointTransform:
    """Turn one sample read from disk (numpy: image uint8 (H, W, 3), label int64 (H, W), depth
    float32 (H, W)) into the sample dict of tensors, with the same geometry for all of them.

    train=True, the paper's recipe (Section 4): random scale in `scale`, random crop to
    crop_size = (H, W) padded at the bottom/right with 0 in the normalised image (the mean
    colour), IGNORE_INDEX in the label and 0 (invalid) in the depth where the scaled image is
    smaller, horizontal flip with p = 0.5.
    train=False: the full image, only normalised; it must be at least MIN_SIZE on each side.
    max_depth: depths beyond it become 0 (invalid) before anything else happens.
    corruption = (name, severity) corrupts the image, and only the image (corrupt.py), in
    evaluation, with a random stream of its own for each (sample name, corruption, severity),
    so the same sample is corrupted the same way in every run and on every rank.
    ood, a mask of out-of-distribution pixels: their label becomes IGNORE_INDEX and their depth
    0; in evaluation the mask is kept as sample['ood'].
    teacher_jitter = (brightness, contrast, saturation, hue) strengths adds 'image_teacher': the
    same pixels colour-jittered, EMUFormer's teacher input (Section 3.3; the paper gives no
    strengths; see TEACHER_JITTER).

    All randomness comes from the global torch RNG, so the caller decides the stream: train.py
    seeds it per sample from (seed, epoch, index). The arithmetic runs on one thread wherever
    it runs: resizing and the jitter's matrix product round differently when split over more
    threads, and a DataLoader worker has one while the main process has all of them, so without
    this the same sample would differ in the last bits between --workers 0 and --workers 2.
    """

    def __init__(self, crop_size=None, train=False, scale=(0.5, 2.0), flip=True,
                 teacher_jitter=None, max_depth=math.inf, corruption=None):
        if train and crop_size is None:
            raise ValueError('a training JointTransform needs crop_size=(H, W)')
        if train and min(crop_size) < MIN_SIZE:
            raise ValueError(f'crop size {tuple(crop_size)} is below the encoder\'s minimum of '
                             f'{MIN_SIZE}x{MIN_SIZE} pixels')
        self.crop_size = crop_size
        self.train = train
        self.scale = scale
        self.flip = flip
        self.teacher_jitter = teacher_jitter
        self.max_depth = max_depth
        self.corruption = corruption

    def __call__(self, image, label, depth, name, ood=None):
        if not image.shape[:2] == label.shape == depth.shape:
            raise ValueError(f'sample {name}: image {image.shape[:2]}, label {label.shape} and '
                             f'depth {depth.shape} must have the same height and width')
        if not self.train and min(label.shape) < MIN_SIZE:
            raise ValueError(f'sample {name}: image of {label.shape[0]}x{label.shape[1]} pixels is below the '
                             f'encoder\'s minimum of {MIN_SIZE}x{MIN_SIZE}')
        depth = np.where(depth > self.max_depth, 0, depth).astype(np.float32)  # beyond the cap: invalid
        if ood is not None:
            label, depth = np.where(ood, IGNORE_INDEX, label), np.where(ood, 0, depth).astype(np.float32)
        if self.corruption is not None and not self.train:
            name_, severity = self.corruption
            rng = np.random.default_rng([zlib.crc32(name.encode()), CORRUPTIONS.index(name_), severity])
            image = corrupt(image, name_, severity, rng)
        with _one_thread():
            sample = self._transform(image, label, depth, name)
        if ood is not None and not self.train:
            sample['ood'] = torch.from_numpy(np.asarray(ood, dtype=bool))
        return sample

    def _transform(self, image, label, depth, name):
        image = torch.from_numpy(image).permute(2, 0, 1).float() / 255  # (H, W, 3) uint8 -> (3, H, W) in [0, 1]
        label, depth = torch.from_numpy(label), torch.from_numpy(depth)
        size = label.shape
        if self.train:
            image, label, depth = random_scale(image, label, depth, self.scale)
            image, label, depth = random_crop(image, label, depth, self.crop_size)
            if self.flip and torch.rand(()).item() < 0.5:
                image, label, depth = image.flip(-1), label.flip(-1), depth.flip(-1)
            size = self.crop_size
        # padding comes last so that it is exactly 0 in both normalised images, never jittered
        sample = {'image': _pad_to(normalize(image), size, 0.0),
                  'label': _pad_to(label, size, IGNORE_INDEX),
                  'depth': _pad_to(depth, size, 0.0),
                  'name': name}
        if self.teacher_jitter:
            sample['image_teacher'] = _pad_to(normalize(color_jitter(image, *self.teacher_jitter)), size, 0.0)
        return sample


@contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# -----------------------------------------------------------------------------
# reading files: every failure names the file


def _read(path, reader):
    """reader(path), with any failure to read or parse re-raised naming the file."""
    try:
        return reader(path)
    except (OSError, ValueError, EOFError, KeyError) as e:
        raise RuntimeError(f'cannot read {path}: {type(e).__name__}: {e}') from e


def _image(path):
    with Image.open(path) as im:
        return np.array(im.convert('RGB'))  # (H, W, 3) uint8


def _png(path):
    with Image.open(path) as im:
        return np.array(im)  # as stored: (H, W) uint8 or uint16, (H, W, 3) for RGB


def _label_png(path):
    """A label image: one channel of class ids (a palette PNG reads as its indices)."""
    label = _png(path)
    if label.ndim != 2:
        raise ValueError(f'{path} is an image with {label.shape[2]} channels (RGB colours?) where a '
                         f'single-channel label image of class ids was expected')
    return label


def _npy(path):
    return np.load(path).astype(np.float32)


def _ood_png(path):
    """An out-of-distribution mask: a one-channel PNG, nonzero = out of distribution."""
    return _label_png(path) != 0


def _disparity_png(path):
    """Cityscapes' disparity: a 16-bit PNG (an 8-bit one would give depths of kilometres)."""
    p = _png(path)
    if p.dtype != np.uint16 and p.dtype != np.int32:  # PIL reads 16-bit greyscale as uint16 or int32
        raise ValueError(f'{path} is a {p.dtype} image with shape {p.shape}; expected the 16-bit '
                         f'single-channel disparity PNG of Cityscapes (disparity = (p - 1) / 256)')
    return p.astype(np.float32)


def _layout_error(what, root, problem, layout_name, layout):
    return f'{what} in {root}: {problem}; expected {layout_name}:\n' + '\n'.join(f'  {root}/{p}' for p in layout)


def _camera(path):
    with open(path) as f:
        camera = json.load(f)
    return camera['extrinsic']['baseline'], camera['intrinsic']['fx']


# -----------------------------------------------------------------------------
# NYUv2


class NYUv2(Dataset):
    """NYUv2 in the NYUD-MT layout (see the module docstring); split is 'train' or 'val'."""

    def __init__(self, root, split, transform):
        self.root = Path(root)
        self.transform = transform
        self.has_ood = (self.root / 'ood').is_dir()  # an anomaly benchmark's masks (README)
        listing = self.root / 'gt_sets' / f'{split}.txt'
        expected = [self.root / d for d in ('images', 'segmentation', 'depth')] + [listing]
        missing = [str(p) for p in expected if not p.exists()]
        self.names = [] if missing else listing.read_text().split()
        if not self.names:
            problem = f'missing {", ".join(missing)}' if missing else f'{listing} lists no samples'
            layout = ['images/<name>.jpg', 'segmentation/<name>.png  (0 = unlabelled, 1..40 = classes)',
                      'depth/<name>.npy  (float metres, 0 = invalid)', f'gt_sets/{split}.txt  (one <name> per line)']
            raise FileNotFoundError(_layout_error(f'NYUv2 {split}', self.root, problem, 'the NYUD-MT layout', layout)
                                    + '\nmake it with: python data.py convert-nyuv2 --help')

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        name = self.names[i]
        image = _read(self.root / 'images' / f'{name}.jpg', _image)
        label_path = self.root / 'segmentation' / f'{name}.png'
        raw = _read(label_path, _label_png).astype(np.int64)
        if raw.max() > 40:
            raise ValueError(f'{label_path}: class id {raw.max()} > 40; expected the 40-class '
                             f'labels (0 = unlabelled, 1..40), not the raw 894 NYUv2 classes')
        label = np.where(raw == 0, IGNORE_INDEX, raw - 1)  # 1..40 -> 0..39, 0 -> ignore
        depth = _read(self.root / 'depth' / f'{name}.npy', _npy)
        ood = self.root / 'ood' / f'{name}.png'
        return self.transform(image, label, depth, name, _read(ood, _ood_png) if self.has_ood else None)


def convert_nyuv2(mat, splits, mapping, out):
    """Write the official NYUv2 files into the NYUD-MT layout under out (see module docstring).

    mat      nyu_depth_v2_labeled.mat: MATLAB v7.3, i.e. HDF5; h5py sees every array transposed,
             'images' (1449, 3, 640, 480) uint8, 'depths' (1449, 640, 480) metres and 'labels'
             (1449, 640, 480) raw class ids 0..894 (0 = unlabelled)
    splits   splits.mat: 'trainNdxs' (795, 1) and 'testNdxs' (654, 1), 1-based image indices
    mapping  classMapping40.mat: 'mapClass' (1, 894), mapClass[0, raw - 1] = 40-class id 1..40
    Sample i (1-based) is named f'{i:06d}'. Finished samples are skipped, so a killed
    conversion can simply be run again.
    """
    try:
        import h5py
        import scipy.io
    except ImportError as e:
        raise ImportError('converting NYUv2 needs h5py and scipy: pip install h5py scipy') from e
    map_class = _mat_entries(scipy.io.loadmat, mapping, ('mapClass',), 'classMapping40.mat')['mapClass'][0]  # (894,)
    to_40 = np.concatenate([[0], map_class]).astype(np.uint8)  # raw id -> 0..40, 0 stays unlabelled
    split_mat = _mat_entries(scipy.io.loadmat, splits, ('trainNdxs', 'testNdxs'), 'splits.mat')
    split_ids = {'train': split_mat['trainNdxs'].ravel(), 'val': split_mat['testNdxs'].ravel()}
    todo = sorted(int(i) for ids in split_ids.values() for i in ids)
    labeled = _mat_entries(lambda p: h5py.File(p, 'r'), mat, ('images', 'labels', 'depths'),
                           'nyu_depth_v2_labeled.mat (MATLAB v7.3)')
    with labeled as f:
        count = len(f['images'])
        if todo and not 1 <= todo[0] <= todo[-1] <= count:
            raise ValueError(f'{splits}: image index {todo[0] if todo[0] < 1 else todo[-1]} is outside 1..{count}, '
                             f'the images of {mat}')
        out = Path(out)  # made only once every input has been read
        for d in ('images', 'segmentation', 'depth', 'gt_sets'):
            (out / d).mkdir(parents=True, exist_ok=True)
        start = time.time()
        for k, i in enumerate(todo, 1):
            name = f'{i:06d}'
            paths = (out / 'images' / f'{name}.jpg', out / 'segmentation' / f'{name}.png',
                     out / 'depth' / f'{name}.npy')
            if not all(p.exists() for p in paths):
                image = f['images'][i - 1].transpose(2, 1, 0)  # (3, W, H) -> (H, W, 3)
                label = to_40[f['labels'][i - 1].T]  # (W, H) -> (H, W), raw ids -> 0..40
                depth = f['depths'][i - 1].T.astype(np.float32)  # (W, H) -> (H, W) metres
                save_atomic(paths[0], lambda f: Image.fromarray(image).save(f, format='JPEG', quality=95))
                save_atomic(paths[1], lambda f: Image.fromarray(label).save(f, format='PNG'))
                save_atomic(paths[2], lambda f: np.save(f, depth))
            if k % 50 == 0 or k == len(todo):
                rate = k / (time.time() - start)
                eta = (len(todo) - k) / rate
                print(f'{k}/{len(todo)} samples, {rate:.1f}/s, ETA {eta:.0f} s', flush=True)
    for split, ids in split_ids.items():  # last: a listed sample is a finished one
        names = ''.join(f'{i:06d}\n' for i in ids)
        save_atomic(out / 'gt_sets' / f'{split}.txt', lambda f: f.write(names.encode()))


def _mat_entries(reader, path, keys, what):
    """reader(path) with `keys` in it (a failure to read, or a missing key, names the file)."""
    try:
        entries = reader(path)
    except FileNotFoundError:
        raise FileNotFoundError(f'{path} does not exist; expected {what}') from None
    except Exception as e:  # scipy and h5py raise many kinds for a file that is not theirs
        raise ValueError(f'cannot read {path} as {what} ({type(e).__name__}: {e})') from None
    missing = [k for k in keys if k not in entries]
    if missing:
        raise ValueError(f'{path} has no {", ".join(missing)}; expected {what}')
    return entries


# -----------------------------------------------------------------------------
# Cityscapes


class Cityscapes(Dataset):
    """Cityscapes in its official layout (see the module docstring); split is 'train' or 'val'.
    Depth comes from the stereo disparity: a pixel p > 0 of the 16-bit disparity PNG means
    d = (p - 1) / 256 pixels, and depth = baseline * fx / d metres; p = 0 (no match) and p = 1
    (d = 0, infinitely far) are invalid, 0. Far depths (d = 1 pixel is about 470 m away) are
    cut at MAX_DEPTH['cityscapes'] by the transform, as for every data set."""

    def __init__(self, root, split, transform):
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.has_ood = (self.root / 'ood' / split).is_dir()  # an anomaly benchmark's masks (README)
        self.images = sorted((self.root / 'leftImg8bit' / split).glob('*/*_leftImg8bit.png'))
        folders = {'leftImg8bit': 'leftImg8bit.png', 'gtFine': 'gtFine_labelIds.png', 'disparity': 'disparity.png',
                   'camera': 'camera.json'}  # the four folders, each with its files' suffix
        missing = [str(self.root / d / split) for d in folders if not (self.root / d / split).is_dir()]
        if missing or not self.images:
            problem = (f'missing {", ".join(missing)}' if missing else
                       f'no {self.root}/leftImg8bit/{split}/<city>/*_leftImg8bit.png')
            layout = [f'{kind}/{split}/<city>/<city>_<seq>_<frame>_{suffix}' for kind, suffix in folders.items()]
            raise FileNotFoundError(_layout_error(f'Cityscapes {split}', self.root, problem, 'the official layout', layout))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        path = self.images[i]
        name = path.name.removesuffix('_leftImg8bit.png')
        city = path.parent.name
        image = _read(path, _image)
        label_ids = _read(self.root / 'gtFine' / self.split / city / f'{name}_gtFine_labelIds.png', _label_png)
        label = _CITYSCAPES_TRAIN_ID[label_ids]
        p = _read(self.root / 'disparity' / self.split / city / f'{name}_disparity.png', _disparity_png)
        baseline, fx = _read(self.root / 'camera' / self.split / city / f'{name}_camera.json', _camera)
        disparity = (p - 1) / 256
        valid = disparity > 0  # p > 1
        depth = np.zeros_like(p)
        depth[valid] = baseline * fx / disparity[valid]
        ood = self.root / 'ood' / self.split / city / f'{name}_ood.png'
        return self.transform(image, label, depth, name, _read(ood, _ood_png) if self.has_ood else None)


# -----------------------------------------------------------------------------


def add_split_options(p, default_split):
    """The options that size the synthetic scenes, spelled alike in every script that reads a
    split (--split): how many scenes each split has, and their size."""
    for split, what, count in (('train', 'training', 200), ('val', 'validation', 50), ('calib', 'calibration', 50)):
        read = f'--split {split}' + (', the default' if split == default_split else '')
        p.add_argument(f'--synthetic-{split}', type=positive_int, default=count,
                       help=f'synthetic only: number of {what} scenes (read with {read})')
    p.add_argument('--synthetic-size', type=positive_int, nargs=2, default=(96, 128), metavar=('H', 'W'),
                   help='synthetic only: scene size')


def build_dataset(name, root, split, train, crop_size=None, teacher_jitter=None, max_depth=None,
                  corruption=None, num_images=None, size=(96, 128), seed=0, annotation_noise=True, ood=False):
    """The data set `name` ('nyuv2', 'cityscapes' or 'synthetic') of split 'train' or 'val'.

    split: 'train', 'val', or 'calib' (data held out of training for calibrate.py: for the
    synthetic scenes fresh ones, seed + 2_000_003; for NYUv2 gt_sets/calib.txt, for Cityscapes
    leftImg8bit/calib/, which the user holds out of the training split).
    train chooses the augmentations (JointTransform), independently of the split; crop_size
    defaults to the paper's: (480, 640) NYUv2, (768, 768) Cityscapes, the full size for the
    synthetic scenes; max_depth defaults to MAX_DEPTH[name]; corruption = (name, severity) for
    evaluation (JointTransform). Synthetic only (root is ignored): num_images (default 200
    train / 50 val), size (H, W), seed, annotation_noise, and ood (out-of-distribution objects,
    marked in sample['ood']); the val scenes use seed + 1_000_003 so that no nearby training
    seed draws them.
    """
    if name not in NUM_CLASSES:
        raise ValueError(f'unknown data set {name!r}; valid: {", ".join(NUM_CLASSES)}')
    if split not in ('train', 'val', 'calib'):
        raise ValueError(f"unknown split {split!r}; valid: train, val, calib")
    if name != 'synthetic' and not root:
        raise ValueError(f'--data {name} needs --root, the data set directory')
    crop_size = crop_size or CROP_SIZES.get(name, size)
    transform = JointTransform(crop_size, train=train, teacher_jitter=teacher_jitter,
                               max_depth=max_depth or MAX_DEPTH[name], corruption=corruption)
    if name == 'nyuv2':
        return NYUv2(root, split, transform)
    if name == 'cityscapes':
        return Cityscapes(root, split, transform)
    return SyntheticScenes(num_images or {'train': 200, 'val': 50, 'calib': 50}[split], transform, size,
                           seed + SEED_OFFSET[split], annotation_noise, ood)


def main(argv=None):
    parser = argparse.ArgumentParser(description='Data set tools; see the docstring of data.py.')
    commands = parser.add_subparsers(dest='command', required=True)
    convert = commands.add_parser('convert-nyuv2', help='official NYUv2 files -> NYUD-MT layout')
    convert.add_argument('--mat', required=True, help='nyu_depth_v2_labeled.mat')
    convert.add_argument('--splits', required=True, help='splits.mat (1-based trainNdxs, testNdxs)')
    convert.add_argument('--mapping', required=True, help='classMapping40.mat (mapClass)')
    convert.add_argument('--out', required=True, help='output root of the NYUD-MT layout')
    args = parser.parse_args(argv)
    convert_nyuv2(args.mat, args.splits, args.mapping, args.out)


if __name__ == '__main__':
    entry_point(main)
