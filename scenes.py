"""
The synthetic scenes: rooms seen by a pinhole camera, drawn on the fly from (seed, index), with
depth and labels from one z-buffer, so that image, labels and depth always agree. They need no
download: the CPU demo, the tests and the out-of-distribution objects of evaluate.py use them.

    SYNTHETIC_CLASSES   the 6 classes, SYNTHETIC_PALETTE their colours
    render_scene        one room: image, label, depth and the mask of unseen objects
    SyntheticScenes     a data set of them (data.build_dataset('synthetic', ...) builds one)

As image files, for tools that read images (predict.py), the validation scenes of --seed:

    python scenes.py --out out/scenes --count 4 [--size H W] [--ood]

data.py imports this file, so nothing here imports data.py: IGNORE_INDEX, the label of a pixel
without a class in every data set, is defined here, the first file of the data that it is
needed in, and data.py takes it from here.
"""

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from plumbing import check_output, entry_point, positive_int, save_atomic

IGNORE_INDEX = 255  # the label of a pixel without a class (unlabelled, Cityscapes' void classes)

SYNTHETIC_CLASSES = ('floor', 'wall', 'ceiling', 'box', 'ball', 'pillar')
SYNTHETIC_PALETTE = np.array([
    (128, 64, 0), (255, 200, 100), (100, 200, 255), (220, 40, 40), (40, 80, 220), (60, 180, 60)],
    np.uint8)  # SYNTHETIC_PALETTE[k] is the RGB colour of class k, for visualisation
# the splits' scenes come from seed + offset: far apart, so that no nearby training seed draws
# the val or calib scenes
SEED_OFFSET = {'train': 0, 'val': 1_000_003, 'calib': 2_000_003}

# -----------------------------------------------------------------------------
# a room seen by a pinhole camera, with depth and labels from one z-buffer

FLOOR, WALL, CEILING, BOX, BALL, PILLAR = range(len(SYNTHETIC_CLASSES))
_COLOURS = np.array([(0.55, 0.40, 0.25), (0.75, 0.72, 0.62), (0.90, 0.90, 0.92),
                     (0.80, 0.25, 0.20), (0.20, 0.45, 0.85), (0.60, 0.60, 0.62)])  # rendering, RGB in [0, 1]
_LIGHT = np.array([-0.5, 0.6, -0.6]) / np.linalg.norm([-0.5, 0.6, -0.6])  # towards the light: up, left, front


def _fog(z):
    """Far surfaces are darker: a depth cue in the image, as in a dim room."""
    return np.exp(-z / 12)


def _lambert(nx, ny, nz):
    """Ambient plus diffuse shading of a surface with unit normal (nx, ny, nz) (camera axes:
    x right, y up, z forward)."""
    return 0.35 + 0.65 * np.clip(nx * _LIGHT[0] + ny * _LIGHT[1] + nz * _LIGHT[2], 0, 1)


@dataclass
class _Room:
    """A camera cam_h metres above the floor looking along it towards a back wall at wall_z, the
    ceiling room_h above the floor; focal length f and principal point (cx, cy) in pixels, the
    horizon at row cy. u (W,) and v (H, 1) are the pixel centres, dv = v - cy (> 0 below the
    horizon)."""
    cam_h: float
    room_h: float
    wall_z: float
    f: float
    cx: float
    cy: float
    u: np.ndarray
    v: np.ndarray

    @property
    def dv(self):
        return self.v - self.cy


def _random_room(rng, size):
    h, w = size
    cam_h, room_h, wall_z = rng.uniform(1.2, 1.8), rng.uniform(2.6, 3.4), rng.uniform(4.0, 9.0)
    f = w * rng.uniform(0.7, 1.0)  # focal length in pixels
    cy = h * rng.uniform(0.4, 0.6)  # the horizon row moves with the camera's pitch
    return _Room(cam_h, room_h, wall_z, f, w / 2, cy, np.arange(w) + 0.5, (np.arange(h) + 0.5)[:, None])


class _ZBuffer:
    """The nearest surface so far at every pixel: its depth, class, base colour and shading
    (light, texture, fog). draw() paints a surface where it is nearer than what is there, so
    nearer objects occlude farther ones and labels, depth and image agree."""

    def __init__(self, size):
        self.depth = np.full(size, np.inf)
        self.label = np.zeros(size, np.int64)
        self.base = np.zeros((*size, 3))
        self.shade = np.zeros(size)

    def draw(self, mask, z, shade, colour, cls):
        z = np.broadcast_to(np.where(mask, z, np.inf), self.depth.shape)
        near = z < self.depth
        self.depth[near] = z[near]
        self.shade[near] = np.broadcast_to(shade, self.depth.shape)[near]
        self.base[near] = np.broadcast_to(np.clip(colour, 0, 1), self.base.shape)[near]  # (3,) or (H, W, 3)
        self.label[near] = cls


def _draw_room(zb, room, rng):
    """Floor (0.6 m tiles), ceiling and the back wall (0.5 m wallpaper stripes): the depth of a
    plane at height y is y * f / (row distance from the horizon)."""
    r, u, dv = room, room.u, room.dv
    floor_z = r.cam_h * r.f / np.maximum(dv, 1e-9)
    seen = np.minimum(floor_z, r.wall_z)  # finite where the texture is visible at all
    tiles = (np.floor((u - r.cx) * seen / r.f / 0.6) + np.floor(seen / 0.6)) % 2
    zb.draw(dv > 0, floor_z, (0.8 + 0.2 * tiles) * _fog(seen), _COLOURS[FLOOR], FLOOR)
    ceiling_z = (r.room_h - r.cam_h) * r.f / np.maximum(-dv, 1e-9)
    zb.draw(dv < 0, ceiling_z, _fog(np.minimum(ceiling_z, r.wall_z)), _COLOURS[CEILING], CEILING)
    stripes = 0.9 + 0.1 * np.cos(2 * np.pi * (u - r.cx) * r.wall_z / r.f / 0.5)
    zb.draw(True, r.wall_z, stripes * _fog(r.wall_z), _COLOURS[WALL] + rng.uniform(-0.1, 0.1, 3), WALL)


def _draw_object(zb, room, rng):
    """A box, a ball or a floor-to-ceiling pillar standing on the floor, at a random place."""
    r, u, dv = room, room.u, room.dv
    cls = rng.choice([BOX, BALL, PILLAR], p=[0.45, 0.4, 0.15])
    colour = _COLOURS[cls] + rng.uniform(-0.1, 0.1, 3)
    z0 = rng.uniform(1.5, r.wall_z - 0.8)  # front of the object
    x0 = rng.uniform(-0.8, 0.8) * z0 * r.cx / r.f  # lateral position, inside the view
    if cls == BOX:
        bw, bh, bd = rng.uniform(0.4, 1.2), rng.uniform(0.3, r.cam_h - 0.1), rng.uniform(0.3, 1.0)
        front = ((abs(u - r.cx - r.f * x0 / z0) < r.f * bw / 2 / z0)
                 & (dv > r.f * (r.cam_h - bh) / z0) & (dv < r.f * r.cam_h / z0))
        zb.draw(front, z0, 0.8 * _fog(z0), colour, BOX)
        top_z = (r.cam_h - bh) * r.f / np.maximum(dv, 1e-9)  # the lid, a plane below the camera
        top = (dv > 0) & (top_z >= z0) & (top_z <= z0 + bd) & (abs((u - r.cx) * top_z / r.f - x0) < bw / 2)
        zb.draw(top, top_z, _fog(np.minimum(top_z, r.wall_z)), colour, BOX)
    elif cls == BALL:
        radius = rng.uniform(0.2, 0.5)
        zc = z0 + radius  # centre, resting on the floor
        dx = (u - r.cx - r.f * x0 / zc) / (r.f * radius / zc)  # offsets in projected radii
        dy = (dv - r.f * (r.cam_h - radius) / zc) / (r.f * radius / zc)
        nz = np.sqrt(np.clip(1 - dx**2 - dy**2, 0, 1))
        zb.draw(dx**2 + dy**2 < 1, zc - radius * nz, _lambert(dx, -dy, -nz) * _fog(zc), colour, BALL)
    else:
        radius = rng.uniform(0.1, 0.3)
        zc = z0 + radius  # axis of a floor-to-ceiling column
        dx = (u - r.cx - r.f * x0 / zc) / (r.f * radius / zc)
        nz = np.sqrt(np.clip(1 - dx**2, 0, 1))
        mask = (abs(dx) < 1) & (dv > -r.f * (r.room_h - r.cam_h) / zc) & (dv < r.f * r.cam_h / zc)
        zb.draw(mask, zc - radius * nz, _lambert(dx, 0, -nz) * _fog(zc), colour, PILLAR)


UNKNOWN = len(SYNTHETIC_CLASSES)  # the z-buffer's class of out-of-distribution objects
_UNKNOWN_COLOURS = np.array([(0.15, 0.85, 0.2), (0.85, 0.1, 0.75)])  # green and magenta: no class has either


def _draw_unknown(zb, room, rng):
    """An object of a kind never drawn in training, for out-of-distribution evaluation: a
    pyramid standing on the floor, its face a triangle towards the camera, painted in a green
    and magenta checkerboard of 0.15 m squares (no training class has the shape, the colours or
    the texture)."""
    r, u, dv = room, room.u, room.dv
    z0 = rng.uniform(2.0, 3.5)  # nearer than most of the room's objects, far enough to be in view
    x0 = rng.uniform(-0.7, 0.7) * z0 * r.cx / r.f
    width, height = rng.uniform(0.6, 1.5), rng.uniform(1.0, r.room_h - 0.3)
    x = (u - r.cx) * z0 / r.f - x0  # (W,) metres from the axis, on the face's plane
    y = r.cam_h - dv * z0 / r.f  # (H, 1) metres above the floor
    face = (y >= 0) & (y <= height) & (np.abs(x) <= width / 2 * (1 - y / height))
    checker = ((np.floor(x / 0.15) + np.floor(y / 0.15)) % 2).astype(int)  # (H, W) 0 or 1
    zb.draw(face, z0, 0.9 * _fog(z0), _UNKNOWN_COLOURS[checker], UNKNOWN)


def _annotate(label, depth, room, rng):
    """What real ground truth has (in place): a careless annotator's thin strokes labelled with
    a wrong class or IGNORE_INDEX, and elliptic holes of depth 0 of a depth sensor."""
    u, v = room.u, room.v
    h, w = label.shape
    for _ in range(rng.integers(1, 4)):
        a, b = rng.uniform(0, 1, 2) * (w, h), rng.uniform(0, 1, 2) * (w, h)
        ab = b - a
        t = np.clip(((u - a[0]) * ab[0] + (v - a[1]) * ab[1]) / (ab @ ab + 1e-9), 0, 1)
        stroke = np.hypot(u - a[0] - t * ab[0], v - a[1] - t * ab[1]) < rng.uniform(0.5, 1.5)
        label[stroke] = IGNORE_INDEX if rng.random() < 0.5 else rng.integers(len(SYNTHETIC_CLASSES))
    for _ in range(rng.integers(0, 3)):
        (ex, ey), (rx, ry) = rng.uniform(0, 1, 2) * (w, h), rng.uniform(0.03, 0.12, 2) * (w, h)
        depth[((u - ex) / rx) ** 2 + ((v - ey) / ry) ** 2 < 1] = 0


def render_scene(rng, size, annotation_noise=True, ood_rng=None):
    """Draw a random room at size (H, W) -> image uint8 (H, W, 3), label int64 (H, W), depth
    float32 (H, W) in metres (z along the optical axis, like a depth sensor), and the mask of
    out-of-distribution pixels (None without ood_rng).

    Every surface is painted into one z-buffer with its depth, class, colour and shading; the
    nearest surface wins each pixel. Floor (tiled) and ceiling depth grow towards the horizon;
    2 to 5 boxes, balls and pillars stand on the floor. annotation_noise adds strokes of wrong
    labels and holes in the depth (_annotate). With ood_rng, one or two objects of no training
    class (_draw_unknown) are drawn from it, after the others: everything drawn from rng stays
    as it is without them.
    """
    room = _random_room(rng, size)
    zb = _ZBuffer(size)
    _draw_room(zb, room, rng)
    for _ in range(rng.integers(2, 6)):
        _draw_object(zb, room, rng)
    for _ in range(ood_rng.integers(1, 3) if ood_rng is not None else 0):
        _draw_unknown(zb, room, ood_rng)
    ood = zb.label == UNKNOWN if ood_rng is not None else None
    depth = zb.depth.astype(np.float32)  # the wall is everywhere: all finite
    image = zb.base * zb.shade[..., None]  # (H, W, 3)
    image += rng.normal(0, rng.uniform(0.01, 0.04), image.shape)  # sensor noise
    image = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    if annotation_noise:
        _annotate(zb.label, depth, room, rng)
    return image, zb.label, depth, ood


class SyntheticScenes(Dataset):
    """num_images rendered rooms of size (H, W); scene i depends only on (seed, i), so any
    subset, length or worker order gives the same scenes. Classes: SYNTHETIC_CLASSES. With
    ood=True the same scenes gain out-of-distribution objects (render_scene), drawn from a
    random stream of their own, so that everything else in the scene stays as it was.
    transform(image, label, depth, name, ood) makes a sample of a scene's arrays: data.py's
    JointTransform, which build_dataset passes (render() alone needs none)."""

    def __init__(self, num_images, transform, size=(96, 128), seed=0, annotation_noise=True, ood=False):
        self.num_images, self.transform, self.size = num_images, transform, size
        self.seed, self.annotation_noise, self.ood = seed, annotation_noise, ood

    def __len__(self):
        return self.num_images

    def render(self, i):
        """Scene i as render_scene draws it: image, label, depth, ood mask (or None)."""
        rng = np.random.default_rng([self.seed, i])
        ood_rng = np.random.default_rng([self.seed, i, 1]) if self.ood else None
        return render_scene(rng, self.size, self.annotation_noise, ood_rng)

    def __getitem__(self, i):
        image, label, depth, ood = self.render(i)
        return self.transform(image, label, depth, f'synthetic_{self.seed}_{i:06d}', ood)


# -----------------------------------------------------------------------------


def render_val_scenes(out, count, size, seed, ood, overwrite=False):
    """Write validation scenes 0..count-1 (build_dataset's 'val' split, seed `seed`) to the folder
    `out` as PNG images, scene_000.png ..., for predict.py or any other tool that reads images."""
    check_output(out, '--out', overwrite, folder=True)
    scenes = SyntheticScenes(count, None, tuple(size), seed + SEED_OFFSET['val'], ood=ood)
    for i in range(count):
        image = scenes.render(i)[0]
        save_atomic(Path(out) / f'scene_{i:03d}.png', lambda f: Image.fromarray(image).save(f, format='PNG'))
    print(f'wrote {count} scene(s) of {size[0]}x{size[1]} to {out}')


def main(argv=None):
    parser = argparse.ArgumentParser(description='The synthetic validation scenes as PNG images; '
                                                 'see the docstring of scenes.py.')
    parser.add_argument('--out', required=True, help='output folder (must be empty unless --overwrite)')
    parser.add_argument('--count', type=positive_int, default=4, help='how many scenes (0, 1, ... of the val split)')
    parser.add_argument('--size', type=positive_int, nargs=2, default=(96, 128), metavar=('H', 'W'))
    parser.add_argument('--seed', type=int, default=0, help="the data set's seed, as --seed of train.py")
    parser.add_argument('--ood', action='store_true', help='with out-of-distribution objects')
    parser.add_argument('--overwrite', action='store_true')
    args = parser.parse_args(argv)
    render_val_scenes(args.out, args.count, args.size, args.seed, args.ood, args.overwrite)


if __name__ == '__main__':
    entry_point(main)
