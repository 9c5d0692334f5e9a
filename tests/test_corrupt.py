"""Tests of corrupt.py: the contract (shape, dtype, determinism, errors), severity ordering, and
one check per corruption against its ImageNet-C definition written out here."""
import colorsys
import io

import numpy as np
import pytest
from PIL import Image

import corrupt
from corrupt import CORRUPTIONS

RANDOM = {'gaussian_noise', 'shot_noise', 'impulse_noise', 'motion_blur', 'fog'}


def natural_image(h=96, w=128):
    """A smooth colour gradient with flat objects (edges for the blurs) and a fine texture
    (detail for JPEG and pixelate): a little of what a photograph offers the corruptions."""
    y, x = np.mgrid[0:h, 0:w]
    y, x = y / h, x / w
    image = np.stack([0.2 + 0.6 * x, 0.3 + 0.4 * y, 0.6 - 0.3 * x * y], axis=-1)
    image[h // 4:h // 2, w // 5:w // 2] = (0.9, 0.2, 0.1)  # a red box
    image[(y - 0.7) ** 2 + (x - 0.7) ** 2 < 0.02] = (0.1, 0.1, 0.3)  # a dark ball
    image += 0.06 * (np.sin(2 * np.pi * 12 * x) * np.sin(2 * np.pi * 9 * y))[..., None]
    return np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)


def grey(value, h=100, w=100):
    return np.full((h, w, 3), value, np.uint8)


def run(image, name, severity, seed=0):
    return corrupt.corrupt(image, name, severity, np.random.default_rng(seed))


def test_names_in_order():
    assert CORRUPTIONS == ('gaussian_noise', 'shot_noise', 'impulse_noise', 'defocus_blur',
                           'motion_blur', 'brightness', 'contrast', 'fog', 'jpeg_compression',
                           'pixelate')


@pytest.mark.parametrize('size', [(1, 1), (2, 3), (37, 53), (48, 64), (240, 320)])
def test_shape_and_dtype(size):
    image = np.random.default_rng(1).integers(0, 256, (*size, 3), dtype=np.uint8)
    for name in CORRUPTIONS:
        for severity in range(1, 6):
            out = run(image, name, severity)
            assert out.shape == image.shape and out.dtype == np.uint8, (name, severity)


@pytest.mark.parametrize('name', CORRUPTIONS)
def test_deterministic_given_the_rng(name):
    image = natural_image(48, 64)
    first = run(image, name, 3, seed=0)
    np.testing.assert_array_equal(first, run(image, name, 3, seed=0))
    # the random ones draw from the rng; the others must not depend on it
    assert (not np.array_equal(first, run(image, name, 3, seed=1))) == (name in RANDOM)


@pytest.mark.parametrize('name', CORRUPTIONS)
def test_more_severe_changes_the_image_more(name):
    # ImageNet-C's parameters grow monotonically with severity for all ten, so the mean absolute
    # change to the clean image must grow too; checked at 1 < 3 < 5. One draw suffices except
    # for fog, whose change follows its random map's mean level: from severity 3 to 5 it grows
    # by 2.0 grey levels on average, with a std of 2.5 between draws (measured over 200), so it
    # is averaged over 32 maps (4.6 standard errors).
    image = natural_image()
    seeds = range(32) if name == 'fog' else [0]
    change = [np.mean([np.abs(run(image, name, s, seed).astype(int) - image).mean() for seed in seeds])
              for s in (1, 3, 5)]
    assert 0 < change[0] < change[1] < change[2], change


@pytest.mark.parametrize('severity, std', [(1, 0.08), (2, 0.12)])
def test_gaussian_noise_std(severity, std):
    # on mid-grey (128) with std <= 0.12 the clip at 0 and 1 is > 4 std away and the rounding
    # adds a variance of 1/12 grey level^2: both change the std by < 0.1%. The sample std of
    # N = 30000 values has a relative standard error of 1/sqrt(2N) = 0.4%: 2% is 5 of them.
    out = run(grey(128), 'gaussian_noise', severity).astype(float)
    assert out.std() == pytest.approx(std * 255, rel=0.02)
    assert out.mean() == pytest.approx(128, abs=0.6)  # 5 standard errors of the mean, 30.6 / sqrt(N)


def test_shot_noise_is_poisson():
    # x = 128/255 collects Poisson(c x) photons, read back as k / c: every output is one of
    # round(255 k / c), the mean stays x, the variance is x / c
    c = 60
    out = run(grey(128), 'shot_noise', 1)
    levels = np.rint(255 * np.arange(c + 1) / c)
    assert np.isin(out, levels).all()
    x = 128 / 255
    # the sample variance of N = 30000 values has a relative standard error of sqrt(2 / N) =
    # 0.8% (Poisson(30) is close to Gaussian); 5% is 6 of them
    assert (out / 255).var() == pytest.approx(x / c, rel=0.05)
    assert (out / 255).mean() == pytest.approx(x, abs=5 * np.sqrt(x / c / out.size))


@pytest.mark.parametrize('severity, amount', [(1, 0.03), (5, 0.27)])
def test_impulse_noise_fraction(severity, amount):
    # every channel value is replaced with probability `amount`, by 0 or 255 with equal odds; on
    # mid-grey every replacement is a change. Tolerances: 5 binomial standard errors, which on
    # 270000 values is 0.0016 at amount 0.03.
    out = run(grey(128, 300, 300), 'impulse_noise', severity)
    changed = out != 128
    assert np.isin(out[changed], (0, 255)).all()
    n = out.size
    assert changed.mean() == pytest.approx(amount, abs=5 * np.sqrt(amount * (1 - amount) / n))
    salt = (out[changed] == 255).mean()
    assert salt == pytest.approx(0.5, abs=5 * np.sqrt(0.25 / changed.sum()))


def test_defocus_blur_keeps_a_constant():
    # the kernel sums to 1 up to radius 6; at radii 8 and 10 ImageNet-C's anti-aliasing counts the
    # rim of the disk twice and the kernel sums to 1.0130 and 1.0108 (see corrupt.py), with a
    # border that reflects the constant, so the constant is multiplied by exactly that
    sums = [1, 1, 1, 1.012976, 1.010786]
    for severity, total in enumerate(sums, 1):
        out = run(grey(100, 37, 53), 'defocus_blur', severity)
        np.testing.assert_array_equal(out, np.rint(100 * total))


def test_defocus_blur_spreads_a_point_into_a_disk():
    # severity 1: radius 3, anti-alias sigma 0.1 (a neighbour weighs e^-50: nothing). A white point
    # spreads evenly over the 29 pixels with dy^2 + dx^2 <= 9 and nowhere else.
    image = np.zeros((21, 21, 3), np.uint8)
    image[10, 10] = 255
    dy, dx = np.mgrid[-10:11, -10:11]
    disk = dy ** 2 + dx ** 2 <= 9
    expected = np.where(disk, np.rint(255 / disk.sum()), 0)
    out = run(image, 'defocus_blur', 1)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], expected)
    # the border is cv2's BORDER_REFLECT_101 (..cb|abc..): beyond a white last column lie the
    # black columns before it, so only the disk's own column of 7 pixels sees white (a repeated
    # edge would give 18 of 29, a mirror that repeats it 12 of 29)
    image = np.zeros((21, 21, 3), np.uint8)
    image[:, -1] = 255
    np.testing.assert_array_equal(run(image, 'defocus_blur', 1)[:, -1], np.rint(255 * 7 / 29))


@pytest.mark.parametrize('severity', [1, 5])
def test_motion_blur_is_imagemagicks_line(severity):
    # ImageMagick's MotionBlurImage written out: output(p) = sum_i w_i input(p + o_i), with
    # o_i = i (cos a, sin a) rounded half down and w_i ~ exp(-i^2 / 2 sigma^2), i = 0..2 radius.
    # A white point therefore leaves a trail at p - o_i of brightness 255 w_i. The angle is the
    # one draw motion_blur makes from the rng.
    radius, sigma = {1: (10, 3), 5: (20, 15)}[severity]
    angle = np.random.default_rng(7).uniform(-45, 45)
    i = np.arange(2 * radius + 1)
    w = np.exp(-i ** 2 / (2 * sigma ** 2))
    w /= w.sum()
    oy = np.ceil(i * np.sin(np.deg2rad(angle)) - 0.5).astype(int)
    ox = np.ceil(i * np.cos(np.deg2rad(angle)) - 0.5).astype(int)
    image = np.zeros((101, 101, 3), np.uint8)
    image[50, 50] = 255
    expected = np.zeros((101, 101))
    np.add.at(expected, (50 - oy, 50 - ox), 255 * w)
    out = run(image, 'motion_blur', severity, seed=7)
    # a value exactly between two grey levels may round either way in float32: 1 level
    np.testing.assert_allclose(out, np.repeat(np.rint(expected)[..., None], 3, -1), atol=1)
    assert out[50, 50, 0] == out.max()  # tap 0, the pixel itself, weighs most


def test_motion_blur_keeps_a_constant_and_repeats_the_border():
    # the kernel sums to 1; and beyond the image ImageMagick repeats the border pixel, so a white
    # last column stays white: every tap samples a column at or right of the pixel's own
    # (|angle| <= 45 degrees), that is the white column or its repetitions
    edge = np.zeros((37, 53, 3), np.uint8)
    edge[:, -1] = 255
    for severity in range(1, 6):
        np.testing.assert_array_equal(run(grey(77, 37, 53), 'motion_blur', severity), 77)
        np.testing.assert_array_equal(run(edge, 'motion_blur', severity)[:, -1], 255)


def test_brightness_on_grey_is_the_hsv_value_plus_c():
    # a grey pixel has saturation 0 and V = its value: V + c, clipped at 1. In grey levels that
    # is value + 255 c, half-way between two levels for c = 0.1, 0.3, 0.5: either neighbour.
    for severity, c in enumerate([0.1, 0.2, 0.3, 0.4, 0.5], 1):
        for value in (0, 50, 128, 250):
            out = run(grey(value, 4, 5), 'brightness', severity)
            assert (np.abs(out - min(value + 255 * c, 255)) <= 0.5).all(), (severity, value)


def test_brightness_is_the_hsv_round_trip():
    # colourful pixels against the standard library's HSV: rgb -> hsv, v = min(v + c, 1) -> rgb.
    # 1 grey level: a float32 value within 1e-6 of a half may round the other way.
    image = np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image[0, 0] = 0  # black has no hue: it becomes grey
    for severity, c in enumerate([0.1, 0.2, 0.3, 0.4, 0.5], 1):
        expected = np.empty((8, 8, 3))
        for y in range(8):
            for x in range(8):
                h, s, v = colorsys.rgb_to_hsv(*(image[y, x] / 255))
                expected[y, x] = colorsys.hsv_to_rgb(h, s, min(v + c, 1))
        out = run(image, 'brightness', severity)
        np.testing.assert_allclose(out, np.rint(expected * 255), atol=1)


def test_contrast_pulls_each_channel_to_its_mean():
    image = natural_image(37, 53)
    x = image / 255
    mean = x.mean(axis=(0, 1))
    for severity, c in enumerate([0.4, 0.3, 0.2, 0.1, 0.05], 1):
        expected = np.rint(np.clip((x - mean) * c + mean, 0, 1) * 255)
        # 1 grey level: the module computes in float32, this in float64, and a value near a
        # half may round either way
        np.testing.assert_allclose(run(image, 'contrast', severity), expected, atol=1)


def fog_veil(image, severity, thickness):
    """Solve out = (x + t m) M / (M + t) for the fog map m, per channel (M the image's maximum)."""
    x = image / 255
    top = x.max()
    out = run(image, 'fog', severity) / 255
    return (out * (top + thickness) / top - x) / thickness  # (H, W, 3)


@pytest.mark.parametrize('severity, thickness', [(1, 1.5), (5, 3.0)])
def test_fog_is_one_veil_over_all_channels(severity, thickness):
    # the map m is the same for R, G and B; at 64x64 it is the whole (64x64) plasma map, which
    # spans [0, 1]. Out is rounded to 1/255, so m is known to 0.5 / 255 * (M + t) / (M t)
    # < 0.0033: allow 0.01.
    veil = fog_veil(natural_image(64, 64), severity, thickness)
    assert np.ptp(veil, axis=2).max() < 0.01
    assert veil.min() == pytest.approx(0, abs=0.01) and veil.max() == pytest.approx(1, abs=0.01)
    np.testing.assert_array_equal(run(grey(0, 16, 16), 'fog', severity), 0)  # M = 0: black stays black


def test_fog_is_smooth_and_rougher_at_high_severity():
    # a diamond-square map is smooth: neighbours differ by ~0.01-0.03 of its range (white noise
    # in [0, 1]: 1/3). Its noise shrinks by the decay per halving of scale, 2 at severity 1 and
    # 1.4 at severity 5, so severity 5 keeps more fine structure: a larger neighbour difference
    # (the same seed makes the same draws, only the decay differs)
    image = natural_image(64, 64)
    rough = [np.abs(np.diff(fog_veil(image, s, t).mean(axis=2), axis=1)).mean()
             for s, t in ((1, 1.5), (5, 3.0))]
    assert rough[0] < rough[1] < 0.1, rough


def test_jpeg_compression_is_pils_encode_decode():
    image = natural_image(37, 53)
    for severity, quality in enumerate([25, 18, 15, 10, 7], 1):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, 'JPEG', quality=quality)
        np.testing.assert_array_equal(run(image, 'jpeg_compression', severity),
                                      np.asarray(Image.open(buffer)))


def test_pixelate_blocks_are_block_means():
    # severity 2 halves each side: on a 40x60 image every 2x2 block becomes its mean (PIL's
    # fixed-point box filter may round a .5 the other way: 1 level)
    image = np.random.default_rng(4).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    out = run(image, 'pixelate', 2).astype(float)
    blocks = image.reshape(20, 2, 30, 2, 3).astype(float)
    np.testing.assert_allclose(out.reshape(20, 2, 30, 2, 3),
                               np.broadcast_to(blocks.mean(axis=(1, 3), keepdims=True), blocks.shape),
                               atol=1)
    assert (out[0::2] == out[1::2]).all() and (out[:, 0::2] == out[:, 1::2]).all()


def test_pixelate_is_piecewise_constant_at_odd_sizes():
    # a random 37x53 image shrunk to int(37 c) x int(53 c) and enlarged: the output can change
    # between neighbouring rows at most int(37 c) - 1 times, likewise for columns
    image = np.random.default_rng(5).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for severity, c in enumerate([0.6, 0.5, 0.4, 0.3, 0.25], 1):
        out = run(image, 'pixelate', severity)
        row_changes = (out[1:] != out[:-1]).any(axis=(1, 2)).sum()
        col_changes = (out[:, 1:] != out[:, :-1]).any(axis=(0, 2)).sum()
        assert (row_changes, col_changes) == (int(37 * c) - 1, int(53 * c) - 1)


@pytest.mark.parametrize('name, severity, bad', [
    ('gaussian_blur', 1, "'gaussian_blur'"), ('fog', 0, 'severity 0'), ('fog', 6, 'severity 6')])
def test_bad_name_or_severity(name, severity, bad):
    with pytest.raises(ValueError) as error:
        run(grey(128, 4, 4), name, severity)
    message = str(error.value)
    assert bad in message
    assert ('pixelate' in message) if 'severity' not in bad else ('1, 2, 3, 4, 5' in message)


@pytest.mark.parametrize('severity', [3.0, True, '3', None])
def test_a_severity_that_is_not_an_integer_is_refused(severity):
    # 3.0 == 3 and True == 1 pass a membership test, then index ImageNet-C's lists wrongly or not
    # at all: the severity must be an integer
    with pytest.raises(ValueError, match=f'severity {severity!r} is not one of 1, 2, 3, 4, 5'):
        run(grey(128, 4, 4), 'fog', severity)
    assert run(grey(128, 4, 4), 'fog', np.int64(3)).shape == (4, 4, 3)  # numpy's integers are integers


@pytest.mark.parametrize('image, what', [
    (np.full((4, 4, 3), 0.5), 'float64 (4, 4, 3)'),  # a float image would be read as near black
    (np.zeros((4, 4), np.uint8), 'uint8 (4, 4)'),
    (np.zeros((4, 4, 4), np.uint8), 'uint8 (4, 4, 4)'),
    (np.zeros((0, 4, 3), np.uint8), 'uint8 (0, 4, 3)'),
    ([[0, 0, 0]], 'list')])
def test_an_image_that_is_not_uint8_rgb_is_refused(image, what):
    with pytest.raises(ValueError) as error:
        run(image, 'fog', 1)
    assert str(error.value) == f'the image must be a uint8 (H, W, 3) RGB array with H, W >= 1, not {what}'


def test_an_rng_that_is_not_a_generator_is_refused():
    with pytest.raises(ValueError, match='rng must be a np.random.Generator, not RandomState'):
        corrupt.corrupt(grey(128, 4, 4), 'fog', 1, np.random.RandomState(0))
