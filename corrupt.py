"""
Image corruptions for evaluating uncertainty under distribution shift: ten of the fifteen of
ImageNet-C (Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations", ICLR 2019), at their five severities.

ImageNet-C takes the clean validation images and corrupts each with one of 15 functions in four
families (noise, blur, weather, digital) at severities 1..5, from barely visible to "the object
is hard to see". A model trained on clean images is then evaluated on every (corruption,
severity) copy. For uncertainty this is the test that matters: as the shift grows the model
gets worse, and a useful uncertainty grows with it (the entropy and the predictive variance
of uq.py should rise where the errors rise, and ECE should stay low). The same functions,
applied to bigger images, make the Cityscapes-C / NYUv2-C style benchmarks of segmentation
and depth (Kamann & Rother, CVPR 2020; Michaelis et al.'s `imagecorruptions` package).

Only the evaluation IMAGE is corrupted: the label and the depth map stay as they are. The scene
has not changed, only the camera, the weather or the transmission, so the clean ground truth is
still the truth. None of the ten corruptions here moves a pixel to another place (the blurs,
JPEG and pixelate only mix a pixel with its neighbours), so every label still lies on its object.

    corruption        family   parameter per severity 1..5 (ImageNet-C's make_imagenet_c.py)
    gaussian_noise    noise    std 0.08, 0.12, 0.18, 0.26, 0.38 (image in [0, 1])
    shot_noise        noise    photons per unit intensity 60, 25, 12, 5, 3
    impulse_noise     noise    fraction of salt-and-pepper values 0.03, 0.06, 0.09, 0.17, 0.27
    defocus_blur      blur     disk radius 3, 4, 6, 8, 10 px; anti-alias sigma 0.1, 0.5, ...
    motion_blur       blur     (radius, sigma) (10, 3), (15, 5), (15, 8), (15, 12), (20, 15) px
    brightness        weather  HSV value + 0.1, 0.2, 0.3, 0.4, 0.5
    contrast          digital  contrast factor 0.4, 0.3, 0.2, 0.1, 0.05
    fog               weather  (thickness, roughness decay) (1.5, 2), (2, 2), (2.5, 1.7), ...
    jpeg_compression  digital  JPEG quality 25, 18, 15, 10, 7
    pixelate          digital  downsampling factor 0.6, 0.5, 0.4, 0.3, 0.25

    import numpy as np, corrupt
    rng = np.random.default_rng(0)
    foggy = corrupt.corrupt(image, 'fog', 3, rng)   # uint8 (H, W, 3) -> uint8 (H, W, 3)

The other five of ImageNet-C (glass blur, zoom blur, snow, frost, elastic transform) are not
implemented: glass blur and the elastic transform move pixels, which would take them off their
labels and depths; frost blends in photographs of frost shipped with ImageNet-C; zoom blur and
snow are simply not written yet.

Conventions. Every function below works, as ImageNet-C's do, on a float RGB image x in [0, 1]
(the unit its parameters are in: a noise std of 0.08 is 8% of the range); `corrupt` converts
the uint8 image in and the result out, clipped to [0, 1] and ROUNDED to the nearest of the 256
levels. ImageNet-C truncates instead (np.uint8 of the float result, half a grey level darker on
average) and then stores every corrupted image as a JPEG of quality 85, which adds compression
artefacts to all fifteen corruptions; neither is reproduced, the array is returned as it is.
The rng argument is the only source of randomness (the noises, the motion blur's angle, the fog
map); ImageNet-C draws from numpy's global state, so the distributions are the same but not the
individual draws.

Image size. ImageNet-C was defined for 224x224 images. Parameters in pixels (the blur radii)
keep ImageNet-C's absolute values at every size, as Cityscapes-C does: a 10 px defocus blur is
strong at 224x224 and milder at 1024x2048. Pixelate is a fraction of the size and the noises,
brightness and contrast act per pixel, so they need no choice. The fog map is relative: see
below.

What differs from ImageNet-C's code, which needs scikit-image, OpenCV and ImageMagick (Wand);
this file needs only numpy, torch and pillow:
  impulse_noise   skimage.util.random_noise(mode='s&p', amount=c): every channel value
                  independently is replaced with probability c, by 1 (salt) or 0 (pepper) with
                  equal odds. Reimplemented exactly, two uniform draws per value.
  defocus_blur    a disk of the radius on a grid of at least 17x17, normalised, blurred by
                  cv2.GaussianBlur (3x3, or 5x5 for radii > 8) to anti-alias its edge, and applied
                  with cv2.filter2D (border reflected without repeating the edge pixel, BORDER_
                  REFLECT_101). Reimplemented exactly: the same kernel and border, the
                  correlation done by FFT (torch.fft); compared with OpenCV's result in
                  docs/results.md. At radii 8 and 10 the disk touches the edge of its grid and the
                  reflected border of the anti-aliasing blur counts its rim twice, so the kernel
                  sums to 1.013 and 1.011: severities 4 and 5 also brighten the image by about
                  1%. That is ImageNet-C's kernel and is kept.
  motion_blur     ImageMagick's MotionBlurImage through Wand, at an angle drawn uniformly from
                  [-45, 45] degrees. Reimplemented from ImageMagick's source (effect.c): 2*radius
                  + 1 taps, tap i at i pixels along the angle rounded to the pixel grid,
                  weighted by a half Gaussian exp(-i^2 / 2 sigma^2) normalised to sum 1, image
                  edges extended by repeating the border pixel (ImageMagick's default virtual
                  pixels); done as an FFT correlation too. ImageMagick's 8-bit result (which
                  ImageNet-C reads back through a PNG) is truncated where this one is rounded;
                  compared with ImageMagick's (convert -motion-blur RxS+A) in docs/results.md.
  brightness      skimage rgb2hsv, V = min(V + c, 1), hsv2rgb. With hue and saturation fixed,
                  every RGB channel is V times a function of (H, S), so the round trip is a
                  rescaling of the pixel by V_new / V (a black pixel, S = 0, becomes grey V_new).
                  Computed that way; tests/test_corrupt.py checks it against the HSV round trip
                  of Python's colorsys.
  fog             ImageNet-C draws a 256x256 diamond-square ("plasma") fractal and crops 224x224.
                  Here the map is square with the side the next power of two >= max(H, W) and
                  the top-left H x W is kept (imagecorruptions' choice for Cityscapes-C): the
                  fog's structure scales with the image, rather than a 224 px pattern tiled
                  across it. The map is normalised to [0, 1] over the whole square.
  jpeg_compression, pixelate   PIL as in ImageNet-C; for any size (ImageNet-C wrote 224).
  A side shorter than 1/c pixels would pixelate to nothing; it is kept at one pixel.
"""

import io
import numbers

import numpy as np
import torch
from PIL import Image

# -----------------------------------------------------------------------------
# helpers: correlation with a kernel, the blur kernels, the fog map


def _correlate(x, kernel, border):
    """out[i, j] = sum_uv kernel[u, v] * x[i + u - p, j + v - p] for a (2p+1, 2p+1) kernel and
    every channel of x (H, W, C), as cv2.filter2D; border is np.pad's mode for the pixels
    outside the image ('reflect' is cv2's BORDER_REFLECT_101, 'edge' repeats the border pixel).

    By the convolution theorem correlating with the kernel multiplies the image's spectrum by the
    conjugate of the kernel's. The FFT is circular, but on the image padded by p the wrap-around
    never reaches the H x W outputs kept. Its cost grows with the kernel's size only through the
    padding, where a direct correlation's grows with the kernel's area."""
    p = kernel.shape[0] // 2
    padded = np.pad(x, ((p, p), (p, p), (0, 0)), mode=border)  # np.pad reflects again where p > H or W
    padded = torch.from_numpy(padded.astype(np.float32)).permute(2, 0, 1)  # -> (C, H+2p, W+2p)
    size = padded.shape[1:]
    kernel = torch.from_numpy(kernel.astype(np.float32))
    spectrum = torch.fft.rfft2(padded) * torch.fft.rfft2(kernel, s=size).conj()
    out = torch.fft.irfft2(spectrum, s=size)[:, :x.shape[0], :x.shape[1]]
    return out.permute(1, 2, 0).numpy()  # (C, H, W) -> (H, W, C)


def _disk(radius, alias_blur):
    """ImageNet-C's defocus kernel: a disk of the radius on a grid of at least 17x17, summing to
    1, anti-aliased by a Gaussian of sigma alias_blur (3x3 for radius <= 8, else 5x5) as
    cv2.GaussianBlur does it: the normalised 1-D Gaussian in both directions, reflect-101 border."""
    half = max(radius, 8)
    grid = np.arange(-half, half + 1)
    disk = (grid[:, None] ** 2 + grid[None, :] ** 2 <= radius ** 2).astype(np.float64)
    disk /= disk.sum()
    taps = np.arange(3 if radius <= 8 else 5)
    gauss = np.exp(-(taps - taps.mean()) ** 2 / (2 * alias_blur ** 2))
    gauss /= gauss.sum()
    return _correlate(disk[:, :, None], np.outer(gauss, gauss), 'reflect')[:, :, 0]


def _motion_kernel(radius, sigma, angle):
    """ImageMagick's MotionBlurImage as a (4 radius + 1)^2 kernel centred on the pixel: tap i
    (0..2 radius) samples the pixel at i * (cos, sin)(angle), each coordinate rounded half down
    (ImageMagick's ceil(v - 0.5)), with weight exp(-i^2 / 2 sigma^2) normalised to sum 1. The
    blur is one-sided: the pixel itself weighs most and the taps run one way along the angle,
    so a bright point leaves its trail on the other side."""
    width = 2 * radius + 1  # GetOptimalKernelWidth1D for a radius > 0
    i = np.arange(width)
    weights = np.exp(-i ** 2 / (2 * sigma ** 2))
    weights /= weights.sum()
    dx = np.ceil(i * np.cos(np.deg2rad(angle)) - 0.5).astype(int)
    dy = np.ceil(i * np.sin(np.deg2rad(angle)) - 0.5).astype(int)
    kernel = np.zeros((2 * width - 1, 2 * width - 1))  # offsets reach +-(width - 1) from the centre
    np.add.at(kernel, (width - 1 + dy, width - 1 + dx), weights)  # two taps may round to one pixel
    return kernel


def _noisy_mean(total, wibble, rng):
    """The mean of four neighbours plus uniform noise in [-wibble^2, wibble^2) (ImageNet-C's
    'wibbledmean': the amplitude is wibble times a draw from [-wibble, wibble))."""
    return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)


def _plasma_fractal(size, decay, rng):
    """A size x size (a power of two) diamond-square fractal in [0, 1], periodic in both
    directions. Each pass halves the step of a grid of known points: the centre of every square
    gets the mean of its 4 corners plus noise, then the midpoint of every edge the mean of its
    2 corners and 2 square centres plus noise. The noise amplitude shrinks by `decay` per pass,
    so a small decay leaves more fine structure (ImageNet-C's severity 5 has the smallest)."""
    f = np.zeros((size, size))
    step, wibble = size, 100.0
    while step >= 2:
        half = step // 2
        corners = f[::step, ::step]  # a view: the points known so far
        f[half::step, half::step] = _noisy_mean(
            corners + np.roll(corners, -1, 0) + np.roll(corners, -1, 1) + np.roll(corners, -1, (0, 1)),
            wibble, rng)
        centres = f[half::step, half::step]
        # midpoints on the corner rows: corners left and right, centres below and above
        f[::step, half::step] = _noisy_mean(
            corners + np.roll(corners, -1, 1) + centres + np.roll(centres, 1, 0), wibble, rng)
        # midpoints on the corner columns: corners above and below, centres right and left
        f[half::step, ::step] = _noisy_mean(
            corners + np.roll(corners, -1, 0) + centres + np.roll(centres, 1, 1), wibble, rng)
        step, wibble = half, wibble / decay
    f -= f.min()
    return f / f.max()


def _pil(x):
    """Float RGB in [0, 1] -> PIL image (the values are multiples of 1/255, so this is exact)."""
    return Image.fromarray(np.rint(x * 255).astype(np.uint8))


# -----------------------------------------------------------------------------
# the corruptions: float RGB (H, W, 3) in [0, 1] -> the same, not yet clipped


def gaussian_noise(x, severity, rng):
    """Additive white noise, as in a dark, amplified sensor: x + N(0, c^2) per channel value."""
    c = [0.08, 0.12, 0.18, 0.26, 0.38][severity - 1]
    return x + rng.normal(0.0, c, x.shape)


def shot_noise(x, severity, rng):
    """Photon noise: a value x collects Poisson(c x) photons, read back as count / c. The mean
    stays x, the variance is x / c: brighter is noisier in absolute terms, few photons (small c,
    a dark scene) noisier overall."""
    c = [60, 25, 12, 5, 3][severity - 1]
    return rng.poisson(x * c) / c


def impulse_noise(x, severity, rng):
    """Salt and pepper (skimage's random_noise 's&p', salt_vs_pepper = 0.5): each channel value
    independently is replaced with probability c, by 1 or 0 with equal odds."""
    c = [0.03, 0.06, 0.09, 0.17, 0.27][severity - 1]
    replaced = rng.random(x.shape) <= c  # skimage's Bernoulli trial: uniform <= p
    salt = rng.random(x.shape) <= 0.5
    return np.where(replaced, salt.astype(x.dtype), x)


def defocus_blur(x, severity, rng):
    """An out-of-focus lens spreads a point into a disk: correlation with the anti-aliased disk
    (radius, alias_blur). Radii in pixels, kept at ImageNet-C's values for every image size."""
    radius, alias_blur = [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)][severity - 1]
    return _correlate(x, _disk(radius, alias_blur), 'reflect')


def motion_blur(x, severity, rng):
    """The camera moved during the exposure: ImageMagick's motion blur of (radius, sigma) pixels
    at an angle drawn uniformly from [-45, 45] degrees."""
    radius, sigma = [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)][severity - 1]
    angle = rng.uniform(-45, 45)
    return _correlate(x, _motion_kernel(radius, sigma, angle), 'edge')


def brightness(x, severity, rng):
    """Brighter light: HSV value V + c, clipped at 1, with hue and saturation kept. V is the
    largest channel, and RGB scales with V at fixed (H, S), so the pixel is multiplied by
    V_new / V; black (V = 0, saturation 0 by convention) becomes the grey V_new."""
    c = [0.1, 0.2, 0.3, 0.4, 0.5][severity - 1]
    v = x.max(axis=2, keepdims=True)
    v_new = np.minimum(v + c, 1.0)
    black = v == 0
    return np.where(black, v_new, x * v_new / np.where(black, 1.0, v))


def contrast(x, severity, rng):
    """Low contrast (haze, a cheap display): every channel pulled towards its own mean over the
    image, (x - mean) * c + mean."""
    c = [0.4, 0.3, 0.2, 0.1, 0.05][severity - 1]
    mean = x.mean(axis=(0, 1), keepdims=True)
    return (x - mean) * c + mean


def fog(x, severity, rng):
    """Fog adds a smooth, random veil of light: x + thickness * plasma map, scaled by
    max / (max + thickness) (max the image's brightest value) so that the result stays within
    the image's range; the scene keeps only that fraction of its contrast."""
    thickness, decay = [(1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)][severity - 1]
    h, w = x.shape[:2]
    size = 1 << max(1, (max(h, w) - 1).bit_length())  # the next power of two >= max(H, W), at least 2
    veil = _plasma_fractal(size, decay, rng)[:h, :w, None]  # (H, W, 1): the same for R, G and B
    top = x.max()
    return (x + thickness * veil) * top / (top + thickness)


def jpeg_compression(x, severity, rng):
    """Lossy compression: encode as JPEG at quality c with PIL's defaults (4:2:0 chroma
    subsampling), decode."""
    c = [25, 18, 15, 10, 7][severity - 1]
    buffer = io.BytesIO()
    _pil(x).save(buffer, 'JPEG', quality=c)
    return np.asarray(Image.open(buffer)) / 255


def pixelate(x, severity, rng):
    """Low resolution: shrink to a fraction c of each side with a box filter (each small pixel
    the mean of the pixels it covers), then enlarge back with a box filter (each small pixel
    becomes a block of equal pixels). ImageNet-C enlarges with BOX too; imagecorruptions uses
    NEAREST, which puts a few block edges one pixel elsewhere."""
    c = [0.6, 0.5, 0.4, 0.3, 0.25][severity - 1]
    h, w = x.shape[:2]
    small = _pil(x).resize((max(1, int(w * c)), max(1, int(h * c))), Image.Resampling.BOX)
    return np.asarray(small.resize((w, h), Image.Resampling.BOX)) / 255


FUNCTIONS = {f.__name__: f for f in (
    gaussian_noise, shot_noise, impulse_noise, defocus_blur, motion_blur,
    brightness, contrast, fog, jpeg_compression, pixelate)}
CORRUPTIONS = tuple(FUNCTIONS)


def corrupt(image, name, severity, rng):
    """Corrupt one evaluation image.

    image     uint8 (H, W, 3) RGB, any H, W >= 1
    name      one of CORRUPTIONS
    severity  an integer 1..5, ImageNet-C's parameters for that severity
    rng       np.random.Generator, the only source of randomness: the same state gives the
              same output
    returns   uint8 (H, W, 3)
    Anything else is refused with a ValueError that says what was expected.
    """
    if name not in FUNCTIONS:
        raise ValueError(f"unknown corruption {name!r}; expected one of {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, numbers.Integral) or not 1 <= severity <= 5:
        raise ValueError(f'severity {severity!r} is not one of 1, 2, 3, 4, 5')
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            and image.size > 0):
        what = (f'{image.dtype} {image.shape}' if isinstance(image, np.ndarray) else type(image).__name__)
        raise ValueError(f'the image must be a uint8 (H, W, 3) RGB array with H, W >= 1, not {what}')
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f'rng must be a np.random.Generator, not {type(rng).__name__}')
    x = image / np.float32(255)  # float32 in [0, 1]
    out = FUNCTIONS[name](x, severity, rng)
    return np.rint(np.clip(out, 0, 1) * 255).astype(np.uint8)
