"""Tests of data.py: the on-disk formats read back to the right classes and metres, the NYUv2
converter, the errors on bad input, the joint augmentations and the synthetic scenes. Every
fixture is written here, in the exact formats of the real data sets."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import scenes

MEAN = torch.tensor(data.MEAN).view(3, 1, 1)
STD = torch.tensor(data.STD).view(3, 1, 1)


def unnormalize(image):
    return image * STD + MEAN


# -----------------------------------------------------------------------------
# NYUv2 (NYUD-MT layout)

H, W = 32, 48  # the smallest size the encoder takes is 29 x 29
# segmentation columns in four bands: 0 (unlabelled), 1, 5, 40
NYU_SEG = np.repeat(np.array([0, 1, 5, 40]), W // 4)[None].repeat(H, 0)
NYU_LABEL = np.repeat(np.array([255, 0, 4, 39]), W // 4)[None].repeat(H, 0)


def nyu_depth():
    depth = np.linspace(0.5, 9.5, H * W, dtype=np.float32).reshape(H, W)
    depth[0] = 0  # a row without measurement
    return depth


def write_nyu(root):
    """Three samples: 000001 and 000002 (train, uint8 and uint16 PNGs), 000003 (val)."""
    for d in ('images', 'segmentation', 'depth', 'gt_sets'):
        (root / d).mkdir(parents=True)
    for k, name in enumerate(('000001', '000002', '000003')):
        image = np.full((H, W, 3), (40 * k + 20, 100, 200), np.uint8)  # flat: JPEG keeps it
        Image.fromarray(image).save(root / 'images' / f'{name}.jpg', quality=95)
        seg = NYU_SEG.astype(np.uint16 if k == 1 else np.uint8)
        Image.fromarray(seg).save(root / 'segmentation' / f'{name}.png')
        np.save(root / 'depth' / f'{name}.npy', nyu_depth())
    (root / 'gt_sets' / 'train.txt').write_text('000001\n000002\n')
    (root / 'gt_sets' / 'val.txt').write_text('000003\n')
    return root


@pytest.fixture
def nyu(tmp_path):
    return write_nyu(tmp_path / 'nyuv2')


def test_nyuv2_reads_classes_ignore_and_depth(nyu):
    train = data.build_dataset('nyuv2', nyu, 'train', train=False)
    val = data.build_dataset('nyuv2', nyu, 'val', train=False)
    assert len(train) == 2 and len(val) == 1
    for k, sample in enumerate([train[0], train[1], val[0]]):
        assert sample['name'] == f'00000{k + 1}'
        assert sample['image'].shape == (3, H, W) and sample['image'].dtype == torch.float32
        assert sample['label'].dtype == torch.int64 and sample['depth'].dtype == torch.float32
        assert torch.equal(sample['label'], torch.from_numpy(NYU_LABEL))  # 0 -> 255, 1..40 -> 0..39
        assert torch.equal(sample['depth'], torch.from_numpy(nyu_depth()))  # metres, 0 kept as invalid
        rgb = unnormalize(sample['image']) * 255
        assert torch.allclose(rgb, torch.tensor([40.0 * k + 20, 100, 200]).view(3, 1, 1), atol=3)


def test_nyuv2_rejects_raw_894_class_labels(nyu):
    Image.fromarray(np.full((H, W), 300, np.uint16)).save(nyu / 'segmentation' / '000001.png')
    with pytest.raises(ValueError, match=re.escape(str(nyu / 'segmentation' / '000001.png'))):
        data.build_dataset('nyuv2', nyu, 'train', train=False)[0]


# -----------------------------------------------------------------------------
# NYUv2 converter: a tiny nyu_depth_v2_labeled.mat in the transposed HDF5 layout


def test_convert_nyuv2(tmp_path, capsys):
    h5py = pytest.importorskip('h5py')
    scipy_io = pytest.importorskip('scipy.io')
    n, h, w = 5, 30, 40  # at least the encoder's 29 x 29
    images = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        images[i] = (30 * i + 10, 255 - 30 * i, 120)  # flat colour per image: shows the index
    depths = np.random.default_rng(0).uniform(0.5, 10, (n, h, w)).astype(np.float32)
    depths[:, 0, :3] = 0
    labels = np.random.default_rng(1).choice([0, 1, 2, 100, 894], (n, h, w)).astype(np.uint16)
    with h5py.File(tmp_path / 'labeled.mat', 'w') as f:  # what h5py sees in the real file
        f['images'] = images.transpose(0, 3, 2, 1)  # (N, 3, W, H)
        f['depths'] = depths.transpose(0, 2, 1)  # (N, W, H)
        f['labels'] = labels.transpose(0, 2, 1)
    map_class = (np.arange(894) * 7 % 40 + 1)[None]  # (1, 894): raw id r -> map_class[0, r - 1]
    splits = {'trainNdxs': np.array([[1], [3], [5]]), 'testNdxs': np.array([[2], [4]])}  # (k, 1), 1-based
    scipy_io.savemat(tmp_path / 'splits.mat', splits)
    scipy_io.savemat(tmp_path / 'mapping.mat', {'mapClass': map_class})
    out = tmp_path / 'out'
    argv = ['convert-nyuv2', '--mat', str(tmp_path / 'labeled.mat'), '--splits', str(tmp_path / 'splits.mat'),
            '--mapping', str(tmp_path / 'mapping.mat'), '--out', str(out)]
    data.main(argv)
    assert 'ETA' in capsys.readouterr().out

    assert (out / 'gt_sets' / 'train.txt').read_text() == '000001\n000003\n000005\n'  # 1-based
    assert (out / 'gt_sets' / 'val.txt').read_text() == '000002\n000004\n'
    assert not list(out.rglob('*.tmp*'))
    expected_seg = np.where(labels == 0, 0, map_class[0][np.maximum(labels.astype(int), 1) - 1])
    for i in range(1, n + 1):
        name = f'{i:06d}'
        with Image.open(out / 'images' / f'{name}.jpg') as im:
            assert im.format == 'JPEG' and im.size == (w, h)
            assert np.abs(np.asarray(im, int) - images[i - 1]).max() <= 3
        with Image.open(out / 'segmentation' / f'{name}.png') as im:
            assert im.mode == 'L'
            assert np.array_equal(np.asarray(im), expected_seg[i - 1])
        depth = np.load(out / 'depth' / f'{name}.npy')
        assert depth.dtype == np.float32 and np.array_equal(depth, depths[i - 1])

    sample = data.build_dataset('nyuv2', out, 'val', train=False)[1]  # 000004
    expected_label = np.where(expected_seg[3] == 0, 255, expected_seg[3] - 1)
    assert torch.equal(sample['label'], torch.from_numpy(expected_label))

    # a killed run: a missing file is written again, the rest is kept
    (out / 'depth' / '000002.npy').unlink()
    data.main(argv)
    assert np.array_equal(np.load(out / 'depth' / '000002.npy'), depths[1])


def test_convert_nyuv2_without_h5py_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'h5py', None)  # makes `import h5py` fail
    with pytest.raises(ImportError, match='pip install h5py scipy'):
        data.convert_nyuv2('x.mat', 'splits.mat', 'mapping.mat', tmp_path)


# -----------------------------------------------------------------------------
# Cityscapes (official layout)

CS_IDS = np.array([0, 7, 8, 26, 33, 34, 1, 6])  # label ids of gtFine_labelIds.png
CS_TRAIN = np.array([255, 0, 1, 13, 18, 255, 255, 255])  # their train ids
CS_DISP = np.array([0, 1, 257, 513, 25601, 2, 0, 0])  # 16-bit disparity PNG values
BASELINE, FX = 0.2, 2000.0
# depth = baseline * fx / ((p - 1) / 256): p = 257 -> d = 1 -> 400 m, 513 -> 200 m, 25601 -> 4 m,
# 2 -> d = 1/256 -> 102400 m; p = 0 and p = 1 (d = 0) are invalid
CS_DEPTH = np.array([0, 0, 400, 200, 4, 102400, 0, 0], np.float32)
CS_H, CS_REPEAT = 32, 4  # a 32 x 32 image: each of the 8 columns above 4 pixels wide


def cs_row(values):
    """The 8 values of a fixture row as the (32, 32) image of them."""
    return np.repeat(np.asarray(values), CS_REPEAT)[None].repeat(CS_H, 0)


def write_cityscapes(root):
    for split, city in (('train', 'aachen'), ('val', 'lindau')):
        stem = f'{city}_000000_000019'
        for kind in ('leftImg8bit', 'gtFine', 'disparity', 'camera'):
            (root / kind / split / city).mkdir(parents=True)
        image = np.zeros((CS_H, 8 * CS_REPEAT, 3), np.uint8)
        image[..., 0] = cs_row(np.arange(8) * 30)  # a horizontal ramp
        Image.fromarray(image).save(root / 'leftImg8bit' / split / city / f'{stem}_leftImg8bit.png')
        Image.fromarray(cs_row(CS_IDS).astype(np.uint8)).save(
            root / 'gtFine' / split / city / f'{stem}_gtFine_labelIds.png')
        Image.fromarray(cs_row(CS_DISP).astype(np.uint16)).save(
            root / 'disparity' / split / city / f'{stem}_disparity.png')
        camera = {'extrinsic': {'baseline': BASELINE, 'pitch': 0.04, 'x': 1.7},
                  'intrinsic': {'fx': FX, 'fy': FX, 'u0': 4.0, 'v0': 2.0}}
        (root / 'camera' / split / city / f'{stem}_camera.json').write_text(json.dumps(camera))
    return root


@pytest.fixture
def cityscapes(tmp_path):
    return write_cityscapes(tmp_path / 'cityscapes')


def test_cityscapes_reads_train_ids_and_metres(cityscapes):
    for split, city in (('train', 'aachen'), ('val', 'lindau')):
        ds = data.build_dataset('cityscapes', cityscapes, split, train=False, max_depth=1e6)
        assert len(ds) == 1
        sample = ds[0]
        assert sample['name'] == f'{city}_000000_000019'
        assert torch.equal(sample['label'], torch.from_numpy(cs_row(CS_TRAIN)))
        assert torch.allclose(sample['depth'], torch.from_numpy(cs_row(CS_DEPTH)).float(), rtol=1e-6)
        ramp = torch.from_numpy(cs_row(np.arange(8.0) * 30)).float()
        assert torch.allclose(unnormalize(sample['image'])[0] * 255, ramp, atol=1e-3)


def test_depth_beyond_max_depth_is_invalid(cityscapes, nyu):
    # Cityscapes' default cap is 80 m: 400 m, 200 m and the 102 km of a disparity of 2 are invalid
    depth = data.build_dataset('cityscapes', cityscapes, 'train', train=False)[0]['depth']
    assert torch.equal(depth, torch.from_numpy(cs_row(np.where(CS_DEPTH > 80, 0, CS_DEPTH))).float())
    capped = data.build_dataset('cityscapes', cityscapes, 'train', train=False, max_depth=300)[0]['depth']
    assert torch.equal(capped, torch.from_numpy(cs_row(np.where(CS_DEPTH > 300, 0, CS_DEPTH))).float())
    near = data.build_dataset('nyuv2', nyu, 'train', train=False, max_depth=5.0)[0]['depth']
    assert torch.equal(near, torch.from_numpy(np.where(nyu_depth() > 5, 0, nyu_depth())))
    # the cap holds for training crops as well: one place, before any augmentation
    crop = data.build_dataset('nyuv2', nyu, 'train', train=True, crop_size=(32, 32), max_depth=5.0)[0]['depth']
    assert crop.max() <= 5.0 and crop.max() > 0


def test_cityscapes_8_bit_disparity_is_refused(cityscapes):
    path = cityscapes.parent / CS_FILES[2]
    Image.fromarray(cs_row(CS_DISP % 256).astype(np.uint8)).save(path)  # 8-bit: depths of kilometres
    with pytest.raises(RuntimeError, match=re.escape(str(path)) + '.*uint8.*16-bit'):
        data.build_dataset('cityscapes', cityscapes, 'train', train=False)[0]


def test_rgb_label_image_is_named(nyu, cityscapes):
    path = nyu / 'segmentation' / '000001.png'
    Image.fromarray(np.stack([NYU_SEG.astype(np.uint8)] * 3, -1)).save(path)
    with pytest.raises(RuntimeError, match=re.escape(str(path)) + '.*3 channels.*single-channel'):
        data.build_dataset('nyuv2', nyu, 'train', train=False)[0]
    path = cityscapes.parent / CS_FILES[1]
    Image.fromarray(np.zeros((CS_H, 32, 3), np.uint8)).save(path)
    with pytest.raises(RuntimeError, match=re.escape(str(path)) + '.*single-channel'):
        data.build_dataset('cityscapes', cityscapes, 'train', train=False)[0]


def test_images_below_the_encoders_minimum_are_named(tmp_path):
    root = tmp_path / 'small'
    write_nyu(root)
    np.save(root / 'depth' / '000003.npy', np.ones((20, 40), np.float32))
    Image.fromarray(np.zeros((20, 40), np.uint8)).save(root / 'segmentation' / '000003.png')
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(root / 'images' / '000003.jpg')
    with pytest.raises(ValueError, match="sample 000003: image of 20x40 pixels is below the encoder's minimum of 29x29"):
        data.build_dataset('nyuv2', root, 'val', train=False)[0]
    with pytest.raises(ValueError, match="crop size .16, 64. is below the encoder's minimum"):
        data.build_dataset('nyuv2', root, 'train', train=True, crop_size=(16, 64))


def test_cityscapes_palette_and_mapping():
    assert data.CITYSCAPES_PALETTE.shape == (19, 3) and len(data.CITYSCAPES_CLASSES) == 19
    assert data.NYUV2_PALETTE.shape == (40, 3) and len(data.NYUV2_CLASSES) == 40
    assert len({tuple(c) for c in data.NYUV2_PALETTE}) == 40  # distinct colours
    assert tuple(data.CITYSCAPES_PALETTE[0]) == (128, 64, 128)  # road


# -----------------------------------------------------------------------------
# errors on bad input name the file, the sample or the expected layout


def corrupt(path):
    path.write_bytes(b'this is not the file you are looking for')


def truncate(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


NYU_FILES = ['images/000001.jpg', 'segmentation/000001.png', 'depth/000001.npy']


@pytest.mark.parametrize('damage', [lambda p: p.unlink(), corrupt, truncate],
                         ids=['missing', 'corrupt', 'truncated'])
@pytest.mark.parametrize('file', NYU_FILES)
def test_nyuv2_bad_file_is_named(nyu, file, damage):
    ds = data.build_dataset('nyuv2', nyu, 'train', train=False)  # construction only checks the root
    damage(nyu / file)
    with pytest.raises(RuntimeError, match=re.escape(str(nyu / file))):
        ds[0]
    ds[1]  # the other samples are still fine


CS_STEM = 'cityscapes/{}/train/aachen/aachen_000000_000019_{}'
CS_FILES = [CS_STEM.format('leftImg8bit', 'leftImg8bit.png'), CS_STEM.format('gtFine', 'gtFine_labelIds.png'),
            CS_STEM.format('disparity', 'disparity.png'), CS_STEM.format('camera', 'camera.json')]


@pytest.mark.parametrize('damage', [lambda p: p.unlink(), corrupt], ids=['missing', 'corrupt'])
@pytest.mark.parametrize('file', CS_FILES)
def test_cityscapes_bad_file_is_named(cityscapes, file, damage):
    ds = data.build_dataset('cityscapes', cityscapes, 'train', train=False)
    path = cityscapes.parent / file
    damage(path)
    with pytest.raises(RuntimeError, match=re.escape(str(path))):
        ds[0]


def test_camera_without_fx_is_named(cityscapes):
    path = cityscapes.parent / CS_FILES[3]
    path.write_text(json.dumps({'extrinsic': {'baseline': BASELINE}, 'intrinsic': {}}))
    with pytest.raises(RuntimeError, match=re.escape(str(path)) + '.*fx'):
        data.build_dataset('cityscapes', cityscapes, 'train', train=False)[0]


def test_size_mismatch_names_the_sample(nyu, cityscapes):
    np.save(nyu / 'depth' / '000002.npy', np.ones((H, W + 1), np.float32))
    with pytest.raises(ValueError, match='sample 000002'):
        data.build_dataset('nyuv2', nyu, 'train', train=False)[1]
    Image.fromarray(np.zeros((CS_H, 33), np.uint8)).save(cityscapes.parent / CS_FILES[1])
    with pytest.raises(ValueError, match='sample aachen_000000_000019'):
        data.build_dataset('cityscapes', cityscapes, 'train', train=True, crop_size=(32, 32))[0]


def test_empty_or_wrong_root_lists_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match='gt_sets/train.txt') as e:
        data.build_dataset('nyuv2', tmp_path, 'train', train=False)
    assert 'images/<name>.jpg' in str(e.value) and 'depth/<name>.npy' in str(e.value)
    write_nyu(tmp_path / 'nyu')
    (tmp_path / 'nyu' / 'gt_sets' / 'val.txt').write_text('\n')
    with pytest.raises(FileNotFoundError, match='lists no samples'):
        data.build_dataset('nyuv2', tmp_path / 'nyu', 'val', train=False)
    with pytest.raises(FileNotFoundError, match=r'leftImg8bit/train/<city>') as e:
        data.build_dataset('cityscapes', tmp_path, 'train', train=False)
    missing = str(e.value).split('missing ')[1].split(';')[0]  # every folder of the four, the images' too
    assert all(str(tmp_path / d / 'train') in missing for d in ('leftImg8bit', 'gtFine', 'disparity', 'camera'))
    write_cityscapes(tmp_path / 'cs')
    (tmp_path / 'cs' / 'camera' / 'val' / 'lindau' / 'lindau_000000_000019_camera.json').unlink()
    (tmp_path / 'cs' / 'camera' / 'val' / 'lindau').rmdir()
    (tmp_path / 'cs' / 'camera' / 'val').rmdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / 'cs' / 'camera' / 'val'))):
        data.build_dataset('cityscapes', tmp_path / 'cs', 'val', train=False)


def test_unknown_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match='nyuv2, cityscapes, synthetic'):
        data.build_dataset('kitti', tmp_path, 'train', train=True)
    with pytest.raises(ValueError, match='train, val'):
        data.build_dataset('synthetic', None, 'test', train=False)
    with pytest.raises(ValueError, match='--data nyuv2 needs --root'):
        data.build_dataset('nyuv2', None, 'train', train=False)
    with pytest.raises(ValueError, match='crop_size'):
        data.JointTransform(train=True)


# -----------------------------------------------------------------------------
# augmentations: an image whose colour encodes its label and its depth

COLOURS = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)], np.uint8)


def coded_sample(h=48, w=64, block=12):
    """Blocks of 5 classes in an asymmetric pattern; image = COLOURS[label], depth = 1.5 (label + 1)."""
    y, x = np.mgrid[:h, :w]
    label = ((y // block) * 3 + (x // block) ** 2) % 5
    return COLOURS[label], label.astype(np.int64), (1.5 * (label + 1)).astype(np.float32)


def interior(label):
    """Pixels whose 3x3 neighbourhood has one label (and is not padding or at the crop's
    border, whose outer neighbours are unknown): no interpolation across classes there."""
    pad = torch.nn.functional.pad(label[None, None].float(), (1, 1, 1, 1), value=-1)
    patches = torch.nn.functional.unfold(pad, 3)  # (1, 9, H * W)
    same = (patches == patches[:, 4:5]).all(1).view(label.shape)
    return same & (label != 255)


def check_aligned(sample, colour_key='image'):
    label, depth = sample['label'], sample['depth']
    inside = interior(label)
    assert inside.sum() > 0.25 * (label != 255).sum()
    rgb = unnormalize(sample[colour_key]).permute(1, 2, 0)[inside]  # (N, 3)
    assert torch.allclose(rgb, torch.from_numpy(COLOURS).float()[label[inside]] / 255, atol=1e-5)
    assert torch.equal(depth[label != 255], 1.5 * (label[label != 255] + 1).float())


def test_scale_crop_flip_keep_image_label_depth_aligned():
    image, label, depth = coded_sample()
    transform = data.JointTransform((40, 56), train=True)
    padded = 0
    for seed in range(12):
        torch.manual_seed(seed)
        sample = transform(image, label, depth, 'coded')
        assert sample['image'].shape == (3, 40, 56)
        assert sample['label'].shape == sample['depth'].shape == (40, 56)
        assert set(sample['label'].unique().tolist()) <= {0, 1, 2, 3, 4, 255}  # nearest invents no class
        check_aligned(sample)
        pad = sample['label'] == 255  # the source has no 255: only padding makes it
        assert (sample['depth'][pad] == 0).all() and (sample['image'][:, pad] == 0).all()
        padded += bool(pad.any())
    assert 0 < padded < 12


def test_padding_values_at_bottom_right():
    image, label, depth = coded_sample()
    torch.manual_seed(0)
    transform = data.JointTransform((40, 56), train=True, scale=(0.5, 0.5), teacher_jitter=data.TEACHER_JITTER)
    sample = transform(image, label, depth, 'x')
    # scaled to 24 x 32, the whole image is the crop, padded below and to the right
    for key, value in (('image', 0.0), ('image_teacher', 0.0), ('label', 255), ('depth', 0.0)):
        x = sample[key]
        assert (x[..., 24:, :] == value).all() and (x[..., :, 32:] == value).all(), key
    assert (sample['label'][:24, :32] != 255).all()
    assert (sample['depth'][:24, :32] > 0).all()


def test_flip_is_the_same_for_image_label_and_depth():
    image, label, depth = coded_sample()
    transform = data.JointTransform((48, 64), train=True, scale=(1.0, 1.0))  # only the flip is random
    label_t, depth_t = torch.from_numpy(label), torch.from_numpy(depth)
    image_t = data.normalize(torch.from_numpy(image).permute(2, 0, 1).float() / 255)
    assert not torch.equal(label_t, label_t.flip(-1))
    flips = []
    for seed in range(20):
        torch.manual_seed(seed)
        sample = transform(image, label, depth, 'x')
        flipped = not torch.equal(sample['label'], label_t)
        f = (lambda t: t.flip(-1)) if flipped else (lambda t: t)
        assert torch.equal(sample['label'], f(label_t))
        assert torch.equal(sample['depth'], f(depth_t))
        assert torch.allclose(sample['image'], f(image_t), atol=1e-6)
        flips.append(flipped)
    assert 0 < sum(flips) < 20
    torch.manual_seed(0)
    no_flip = data.JointTransform((48, 64), train=True, scale=(1.0, 1.0), flip=False)
    assert all(torch.equal(no_flip(image, label, depth, 'x')['label'], label_t) for _ in range(10))


def test_teacher_image_same_geometry_other_colours():
    image, label, depth = coded_sample()
    plain = data.JointTransform((40, 56), train=True)
    jitter = data.JointTransform((40, 56), train=True, teacher_jitter=data.TEACHER_JITTER)
    for seed in range(6):
        torch.manual_seed(seed)
        a = plain(image, label, depth, 'x')
        torch.manual_seed(seed)
        b = jitter(image, label, depth, 'x')
        assert 'image_teacher' not in a
        for key in ('image', 'label', 'depth'):  # the jitter draws come last: same student sample
            assert torch.equal(a[key], b[key])
        teacher = unnormalize(b['image_teacher']).permute(1, 2, 0)  # (H, W, 3)
        inside = interior(b['label'])
        for k in b['label'][inside].unique():  # a colour map applied to the same pixels: one colour per class
            colours = teacher[inside & (b['label'] == k)]
            assert (colours - colours[0]).abs().max() < 1e-4
        pad = b['label'] == 255
        assert (b['image_teacher'][:, pad] == 0).all()
        assert (b['image_teacher'] - b['image'])[:, ~pad].abs().max() > 0.05


def test_random_crop_positions_cover_the_image():
    y, x = np.mgrid[:48, :64]
    depth = (100 * y + x).astype(np.float32)  # the depth tells where a pixel came from
    transform = data.JointTransform((40, 56), train=True, scale=(1.0, 1.0), flip=False)
    corners = set()
    for seed in range(30):
        torch.manual_seed(seed)
        d = transform(np.zeros((48, 64, 3), np.uint8), np.zeros((48, 64), np.int64), depth, 'x')['depth']
        top, left = int(d[0, 0]) // 100, int(d[0, 0]) % 100
        assert 0 <= top <= 8 and 0 <= left <= 8
        assert torch.equal(d, torch.from_numpy(depth)[top:top + 40, left:left + 56])
        corners.add((top, left))
    assert len({top for top, _ in corners}) > 3 and len({left for _, left in corners}) > 3


def test_hue_shift_keeps_luma_and_changes_colour():
    image = 0.25 + 0.5 * torch.rand(3, 8, 8)  # mid colours: no clamping
    torch.manual_seed(0)
    out = data.color_jitter(image, 0, 0, 0, 0.1)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    assert torch.allclose((out * luma).sum(0), (image * luma).sum(0), atol=1e-5)
    assert (out - image).abs().max() > 0.01


def test_color_jitter_without_strength_is_identity():
    image = torch.rand(3, 8, 8)
    assert torch.allclose(data.color_jitter(image, 0, 0, 0, 0), image, atol=1e-5)
    out = data.color_jitter(image)
    assert out.shape == image.shape and 0 <= out.min() and out.max() <= 1


def test_eval_is_only_normalisation():
    image, label, depth = coded_sample(50, 70)
    sample = data.JointTransform()(image, label, depth, 'x')
    assert set(sample) == {'image', 'label', 'depth', 'name'}
    expected = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - MEAN) / STD
    assert torch.allclose(sample['image'], expected, atol=1e-6)
    assert torch.equal(sample['label'], torch.from_numpy(label))
    assert torch.equal(sample['depth'], torch.from_numpy(depth))


def test_seeded_augmentation_is_reproducible():
    image, label, depth = coded_sample()
    transform = data.JointTransform((40, 56), train=True, teacher_jitter=data.TEACHER_JITTER)

    def run(seed):
        torch.manual_seed(seed)
        return [transform(image, label, depth, 'x') for _ in range(3)]

    first, again, other = run(7), run(7), run(8)
    keys = ('image', 'image_teacher', 'label', 'depth')
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, again) for k in keys)
    assert not all(torch.equal(a[k], b[k]) for a, b in zip(first, other) for k in keys)


class Repeated(torch.utils.data.Dataset):
    """The same coded sample n times: what differs between items is only the augmentation."""

    def __init__(self, n):
        self.n, self.transform = n, data.JointTransform((40, 56), train=True)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.transform(*coded_sample(), f'{i}')


def test_dataloader_workers_draw_different_reproducible_augmentations():
    def labels(seed):
        torch.manual_seed(seed)
        loader = torch.utils.data.DataLoader(Repeated(4), batch_size=1, num_workers=2)
        return [batch['label'] for batch in loader]

    first = labels(0)
    assert not torch.equal(first[0], first[1])  # items 0 and 1 come from different workers
    assert all(torch.equal(a, b) for a, b in zip(first, labels(0)))


# -----------------------------------------------------------------------------
# synthetic scenes


def test_synthetic_is_deterministic_per_seed_and_index():
    a = scenes.SyntheticScenes(3, data.JointTransform(), seed=5)[2]
    b = scenes.SyntheticScenes(10, data.JointTransform(), seed=5)[2]
    for key in ('image', 'label', 'depth'):
        assert torch.equal(a[key], b[key])
    assert a['name'] == b['name']
    assert not torch.equal(a['image'], scenes.SyntheticScenes(3, data.JointTransform(), seed=5)[1]['image'])
    assert not torch.equal(a['image'], scenes.SyntheticScenes(3, data.JointTransform(), seed=6)[2]['image'])
    assert not torch.equal(a['image'], scenes.SyntheticScenes(3, data.JointTransform(), seed=6)[1]['image'])  # no aliasing of seed + index
    train = data.build_dataset('synthetic', None, 'train', train=False)
    val = data.build_dataset('synthetic', None, 'val', train=False)
    assert (len(train), len(val)) == (200, 50)
    assert not torch.equal(train[0]['image'], val[0]['image'])


def test_synthetic_shapes_and_dtypes_for_any_size():
    for size in ((96, 128), (37, 53)):
        sample = scenes.SyntheticScenes(2, data.JointTransform(), size=size)[1]
        assert sample['image'].shape == (3, *size) and sample['image'].dtype == torch.float32
        assert sample['label'].shape == size and sample['label'].dtype == torch.int64
        assert sample['depth'].shape == size and sample['depth'].dtype == torch.float32
    ds = data.build_dataset('synthetic', None, 'train', train=True, teacher_jitter=data.TEACHER_JITTER,
                            num_images=4, size=(48, 64))
    sample = ds[3]
    assert sample['image'].shape == sample['image_teacher'].shape == (3, 48, 64)  # cropped to the full size
    assert data.NUM_CLASSES['synthetic'] == len(data.SYNTHETIC_CLASSES) == 6
    assert data.PALETTES['synthetic'].shape == (6, 3)


def test_synthetic_labels_and_depth_agree():
    floor, wall, ceiling = (data.SYNTHETIC_CLASSES.index(c) for c in ('floor', 'wall', 'ceiling'))
    seen = set()
    for i in range(12):
        sample = scenes.SyntheticScenes(12, data.JointTransform(), seed=1, annotation_noise=False)[i]
        label, depth = sample['label'], sample['depth']
        seen |= set(label.unique().tolist())
        assert (depth > 0).all() and label.max() < 6
        far = depth[label == wall]
        assert far.numel() > 0 and torch.allclose(far, far[0].expand_as(far))  # the back wall is a plane
        assert depth.max() == far[0]  # and everything else is in front of it
        for cls, sign in ((floor, -1), (ceiling, 1)):  # depth grows towards the horizon
            rows = [depth[r][label[r] == cls] for r in range(label.shape[0])]
            rows = [d for d in rows if d.numel()]
            for d in rows:
                assert torch.allclose(d, d[0].expand_as(d))  # a plane: depth depends on the row only
            z = torch.tensor([d[0] for d in rows])
            assert (sign * z.diff() > 0).all()
        objects = label >= 3
        assert (depth[objects] < far[0]).all()
    assert seen == set(range(6))  # every class shows up


def test_synthetic_annotation_noise_touches_only_the_ground_truth():
    clean = scenes.SyntheticScenes(10, data.JointTransform(), annotation_noise=False)
    noisy = scenes.SyntheticScenes(10, data.JointTransform())
    flipped = holes = 0
    for i in range(10):
        a, b = clean[i], noisy[i]
        assert torch.equal(a['image'], b['image'])
        changed = a['label'] != b['label']
        assert changed.float().mean() < 0.1
        flipped += changed.sum().item()
        holes += (b['depth'] == 0).sum().item()
        assert (b['label'][changed] != a['label'][changed]).all()
    assert flipped > 0 and holes > 0
    assert any((noisy[i]['label'] == 255).any() for i in range(10))


# -----------------------------------------------------------------------------
# evaluation under shift: corruptions and out-of-distribution objects


def test_a_corruption_changes_the_image_only_and_the_same_way_every_time():
    clean = data.build_dataset('synthetic', None, 'val', train=False, num_images=3)
    foggy = data.build_dataset('synthetic', None, 'val', train=False, num_images=3, corruption=('fog', 3))
    again = data.build_dataset('synthetic', None, 'val', train=False, num_images=3, corruption=('fog', 3))
    loader = torch.utils.data.DataLoader(again, batch_size=None, num_workers=2)  # other processes too
    for i, worker_sample in enumerate(loader):
        a, b = clean[i], foggy[i]
        assert torch.equal(a['label'], b['label']) and torch.equal(a['depth'], b['depth'])
        assert (a['image'] - b['image']).abs().mean() > 0.05  # the fog is visible
        assert torch.equal(b['image'], worker_sample['image'])  # deterministic per sample
    assert not torch.equal(foggy[0]['image'], foggy[1]['image'])
    # training data is never corrupted
    train = data.build_dataset('synthetic', None, 'train', train=True, num_images=2, corruption=('fog', 3))
    torch.manual_seed(0)
    plain = data.build_dataset('synthetic', None, 'train', train=True, num_images=2)[0]['image']
    torch.manual_seed(0)
    assert torch.equal(train[0]['image'], plain)


def test_synthetic_ood_objects_are_marked_ignored_and_invalid():
    val = data.build_dataset('synthetic', None, 'val', train=False, num_images=6)
    ood = data.build_dataset('synthetic', None, 'val', train=False, num_images=6, ood=True)
    fractions = []
    for i in range(6):
        a, b = val[i], ood[i]
        mask = b['ood']
        assert mask.dtype == torch.bool and mask.shape == a['label'].shape and 'ood' not in a
        fractions.append(mask.float().mean().item())
        assert (b['label'][mask] == data.IGNORE_INDEX).all() and (b['depth'][mask] == 0).all()
        # elsewhere the scene is the validation scene: the objects are drawn from a stream of their own
        assert torch.equal(a['label'][~mask], b['label'][~mask])
        assert torch.equal(a['depth'][~mask], b['depth'][~mask])
    assert all(f > 0 for f in fractions) and max(fractions) < 0.5  # present in every scene, not all of it
    # green and magenta, which no in-distribution surface of the scenes has
    rgb = unnormalize(ood[0]['image']).permute(1, 2, 0)[ood[0]['ood']]
    assert ((rgb[:, 1] > rgb[:, 0] + 0.3) | (rgb[:, 0] > rgb[:, 1] + 0.3)).float().mean() > 0.8


def test_an_ood_folder_gives_every_sample_its_mask(nyu):
    (nyu / 'ood').mkdir()
    mask = np.zeros((H, W), np.uint8)
    mask[4:10, 20:30] = 255
    for name in ('000001', '000002'):
        Image.fromarray(mask).save(nyu / 'ood' / f'{name}.png')
    train = data.build_dataset('nyuv2', nyu, 'train', train=False)
    sample = train[0]
    assert torch.equal(sample['ood'], torch.from_numpy(mask > 0))
    assert (sample['label'][sample['ood']] == data.IGNORE_INDEX).all() and (sample['depth'][sample['ood']] == 0).all()
    (nyu / 'ood' / '000002.png').unlink()
    with pytest.raises(RuntimeError, match=re.escape(str(nyu / 'ood' / '000002.png'))):
        train[1]


def test_scenes_main_writes_the_val_scenes_as_pngs(tmp_path):
    scenes.main(['--out', str(tmp_path / 's'), '--count', '2', '--size', '64', '96', '--ood'])
    val = data.build_dataset('synthetic', None, 'val', train=False, size=(64, 96), ood=True)
    for i in range(2):
        written = np.array(Image.open(tmp_path / 's' / f'scene_{i:03d}.png'))
        assert written.dtype == np.uint8 and written.shape == (64, 96, 3)
        assert np.array_equal(written, val.render(i)[0])  # PNG is lossless: the very image evaluated
    assert val.render(0)[3].any()  # with --ood the unseen objects are in the picture
    with pytest.raises(FileExistsError, match='--out .* already holds a result'):
        scenes.main(['--out', str(tmp_path / 's')])


def test_scenes_do_not_import_data():
    # data.py imports scenes.py: the other way round would tie the two files both ways
    code = 'import sys, scenes; print("data" in sys.modules)'
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                            cwd=str(Path(__file__).parents[1]))
    assert result.stdout.strip() == 'False'


@pytest.mark.parametrize('damage, message', [
    ('text_mat', r'cannot read .*labeled.mat as nyu_depth_v2_labeled.mat'),
    ('text_mapping', r'cannot read .*mapping.mat as classMapping40.mat'),
    ('no_mapclass', r'mapping.mat has no mapClass; expected classMapping40.mat'),
    ('index', r'splits.mat: image index 9 is outside 1..2, the images of .*labeled.mat')])
def test_convert_nyuv2_names_a_bad_input_and_makes_no_folder(tmp_path, damage, message):
    h5py = pytest.importorskip('h5py')
    scipy_io = pytest.importorskip('scipy.io')
    with h5py.File(tmp_path / 'labeled.mat', 'w') as f:
        f['images'] = np.zeros((2, 3, 40, 30), np.uint8)
        f['depths'] = np.ones((2, 40, 30), np.float32)
        f['labels'] = np.zeros((2, 40, 30), np.uint16)
    scipy_io.savemat(tmp_path / 'splits.mat', {'trainNdxs': np.array([[1], [9 if damage == 'index' else 2]]),
                                               'testNdxs': np.array([[2]])})
    scipy_io.savemat(tmp_path / 'mapping.mat', {'other' if damage == 'no_mapclass' else 'mapClass': np.ones((1, 894))})
    if damage.startswith('text_'):
        (tmp_path / f"{'labeled' if damage == 'text_mat' else 'mapping'}.mat").write_text('not a MATLAB file\n')
    with pytest.raises(ValueError, match=message):
        data.main(['convert-nyuv2', '--mat', str(tmp_path / 'labeled.mat'), '--splits', str(tmp_path / 'splits.mat'),
                   '--mapping', str(tmp_path / 'mapping.mat'), '--out', str(tmp_path / 'out')])
    assert not (tmp_path / 'out').exists()
