"""
Pictures, drawn with Pillow alone (no plotting library): Figure-5-like panels of a prediction
and its uncertainty, the reliability diagram of the ECE, and line plots of curves. evaluate.py
and predict.py draw with these.

Every continuous map has a colour bar under it, with ticks at round values and its unit; black
always means "no value here" (an unlabelled pixel, a missing ground-truth depth), and the legend
says so. A map that is zero at every pixel (a single network's epistemic part) is not painted
but says so in text. Colour maps are samples of matplotlib's viridis (depth: near purple, far
yellow) and inferno (uncertainty: dark is certain), which are perceptually even and readable in
grey. In line plots each series has its own colour, marker and dash, so that lines that
coincide stay visible, and each y axis is labelled with its unit.

    rows = prediction_panels(image, pred, i, palette, num_classes, label=..., depth=...)
    save_figure('out/x.png', rows, title='EMUFormer-B0 on synthetic_1000003_000003',
                legend=class_legend(...) + BLACK_MEANS)
"""

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import data
from plumbing import save_atomic


def _lut(anchors):
    """A (256, 3) uint8 colour map, linear between equally spaced anchor colours."""
    anchors = np.array(anchors, dtype=np.float64)
    x, t = np.linspace(0, 1, len(anchors)), np.linspace(0, 1, 256)
    return np.stack([np.interp(t, x, anchors[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)


VIRIDIS = _lut([(68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
                (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37)])
INFERNO = _lut([(0, 0, 4), (31, 12, 72), (85, 15, 109), (136, 34, 106), (186, 54, 85),
                (227, 89, 51), (249, 140, 10), (249, 201, 50), (252, 255, 164)])
ERRORS = _lut([(255, 255, 255), (255, 170, 130), (200, 0, 0)])  # white = right, red = wrong; black stays free
WRONG = (200, 0, 0)
BLACK_MEANS = [('black: unlabelled / no ground-truth depth', (0, 0, 0))]
ERROR_LEGEND = [('right', (255, 255, 255)), ('wrong', WRONG)]


def colorize(values, lut, low, high, valid=None):
    """(H, W) values -> (H, W, 3) uint8 through `lut`, low..high onto its ends (clipped);
    pixels outside `valid` are black."""
    valid = np.ones(values.shape, bool) if valid is None else valid
    t = np.clip((np.where(valid, values, low) - low) / max(high - low, 1e-12), 0, 1)
    rgb = lut[np.rint(t * (len(lut) - 1)).astype(np.int64)]
    rgb[~valid] = 0
    return rgb


def paint(label, palette):
    """(H, W) class ids -> (H, W, 3) in the palette; IGNORE_INDEX is black."""
    palette = np.asarray(palette, np.uint8)
    ignore = label == data.IGNORE_INDEX
    rgb = palette[np.where(ignore, 0, label)]
    rgb[ignore] = 0
    return rgb


@dataclass
class Panel:
    title: str
    pixels: np.ndarray       # (H, W, 3) uint8
    bar: tuple = None        # (lut, low, high, unit): a colour bar under the panel
    note: tuple = ()         # lines of text written over the pixels, centred


# a map that is zero at every pixel is not painted (its darkest colour would look like black,
# "no value here"): a blank panel says so instead
BLANK = (235, 235, 235)
ZERO_NOTE = ('zero at every pixel', '(one network has', 'no epistemic part)')


def nothing_to_show(title, shape):
    """The panel of a map that is zero at every pixel: light grey, with ZERO_NOTE over it."""
    return Panel(title, np.full((*shape, 3), BLANK, np.uint8), note=ZERO_NOTE)


def unnormalize(image):
    """A normalised (3, H, W) image tensor -> (H, W, 3) uint8 RGB (undoes data.normalize)."""
    mean, std = np.array(data.MEAN)[:, None, None], np.array(data.STD)[:, None, None]
    rgb = (image.float().cpu().numpy() * std + mean).clip(0, 1)
    return (rgb * 255).round().astype(np.uint8).transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)


def prediction_panels(image, pred, i, palette, num_classes, label=None, depth=None):
    """The panels of image i of a batch: rows of Panel, None for an empty cell.
    Row 1, segmentation: input, ground truth, prediction, error (wrong red, right white),
    entropy (Eq. 3) on 0..log K, and its aleatoric and epistemic parts where the prediction has
    them. Row 2, depth: ground truth and prediction on one colour scale, |mu - y|, the
    predictive standard deviation (Eq. 10), and the standard deviations of its two terms. An
    epistemic part that is zero at every pixel (a single network's) is a nothing_to_show panel.
    image: (B, 3, H, W) normalised; label, depth: the batch's ground truth, or None
    (predict.py), which leaves out the ground truth and error panels. A task the model lacks
    has no row; the input opens the first row."""
    rows = [[Panel('input', unnormalize(image[i]))]]
    if pred.probs is not None:
        seg = pred.pred[i].cpu().numpy()
        entropy = pred.entropy[i].float().cpu().numpy()
        if label is not None:
            truth = label[i].numpy()
            error = np.full((*truth.shape, 3), 255, np.uint8)
            error[seg != truth] = WRONG
            error[truth == data.IGNORE_INDEX] = 0
            rows[0] += [Panel('ground truth', paint(truth, palette))]
        rows[0] += [Panel('prediction', paint(seg, palette))]
        if label is not None:
            rows[0] += [Panel('segmentation error', error)]
        rows[0] += [Panel('entropy (Eq. 3)', colorize(entropy, INFERNO, 0, math.log(num_classes)),
                          (INFERNO, 0, math.log(num_classes), 'nats'))]
        if pred.aleatoric_entropy is not None:  # Section 2.2: entropy = aleatoric + mutual information
            for title, part in (('aleatoric: mean entropy', pred.aleatoric_entropy),
                                ('epistemic: mutual information', pred.mutual_information)):
                part = part[i].float().cpu().numpy()
                rows[0].append(nothing_to_show(title, part.shape) if not part.any() else
                               Panel(title, colorize(part, INFERNO, 0, math.log(num_classes)),
                                     (INFERNO, 0, math.log(num_classes), 'nats')))
    if pred.depth_mean is not None:
        mu = pred.depth_mean[i].float().cpu().numpy()
        sigma = pred.depth_var[i].float().cpu().sqrt().numpy()
        panels = []
        if depth is not None:
            y = depth[i].numpy()
            valid = data.valid_depth(y)
            both = np.concatenate([y[valid], mu.ravel()])
            low, high = both.min(), both.max()
            error = np.abs(mu - y)
            top = max(error[valid].max() if valid.any() else 0.0, 1e-6)
            panels.append(Panel('GT depth', colorize(y, VIRIDIS, low, high, valid), (VIRIDIS, low, high, 'm')))
        else:
            low, high = mu.min(), mu.max()
        panels.append(Panel('predicted depth', colorize(mu, VIRIDIS, low, high), (VIRIDIS, low, high, 'm')))
        if depth is not None:
            panels.append(Panel('|mu - y|', colorize(error, ERRORS, 0, top, valid), (ERRORS, 0, top, 'm')))
        top = max(sigma.max(), 1e-6)
        panels.append(Panel('depth std (Eq. 10)', colorize(sigma, INFERNO, 0, top), (INFERNO, 0, top, 'm')))
        if pred.aleatoric_var is not None:  # the std of each of Eq. 10's two terms, on the total's scale
            for title, part in (('aleatoric std', pred.aleatoric_var), ('epistemic std', pred.epistemic_var)):
                part = part[i].float().cpu().sqrt().numpy()
                panels.append(nothing_to_show(title, part.shape) if not part.any() else
                              Panel(title, colorize(part, INFERNO, 0, top), (INFERNO, 0, top, 'm')))
        if len(rows[0]) == 1:  # depth only: one row after the input
            rows[0] += panels
        else:
            rows.append([None] + panels)
    return rows


def class_legend(class_ids, palette, class_names):
    """(name, colour) of the classes among class_ids (IGNORE_INDEX left out)."""
    return [(class_names[k], palette[k]) for k in np.unique(class_ids) if k != data.IGNORE_INDEX]


# ---------------------------------------------------------------------------------------------
# the figure: a title, a grid of panels with colour bars, a legend

FONT = ImageFont.load_default(size=12)  # Pillow's own font: no font files needed
PAD, TITLE_HEIGHT, BAR_HEIGHT, MIN_PANEL_WIDTH, LEGEND_LINE = 6, 16, 26, 200, 16


def panel_scale(width):
    """Small images are enlarged by an integer factor (nearest) so that titles fit."""
    return max(1, math.ceil(MIN_PANEL_WIDTH / width))


def figure_layout(rows):
    """(scale, cell width, cell height, origin(r, c)): where save_figure puts the pixels of the
    panel in row r, column c (top-left corner, below the figure's title and the panel's)."""
    h, w = next(p for row in rows for p in row if p is not None).pixels.shape[:2]
    s = panel_scale(w)
    bars = any(p is not None and p.bar is not None for row in rows for p in row)
    cell_w, cell_h = w * s + PAD, TITLE_HEIGHT + h * s + (BAR_HEIGHT if bars else 0) + PAD
    origin = lambda r, c: (PAD + c * cell_w, PAD + TITLE_HEIGHT + r * cell_h + TITLE_HEIGHT)
    return s, cell_w, cell_h, origin


def _legend_lines(legend, width):
    """Wrap the legend's (name, rgb) entries into lines of (x, name, rgb) as wide as the figure."""
    lines, x = [[]], PAD
    for name, rgb in legend:
        entry = 14 + FONT.getlength(name) + 12  # swatch, gap, name, space
        if x + entry > width and lines[-1]:
            lines.append([])
            x = PAD
        lines[-1].append((x, name, rgb))
        x += entry
    return lines if legend else []


def _ticks(low, high, count=5):
    """About `count` round tick values covering [low, high]."""
    span = max(high - low, 1e-12)
    step = 10 ** math.floor(math.log10(span / count))
    step *= min((m for m in (1, 2, 2.5, 5, 10) if span / (m * step) <= count), default=10)
    first = math.ceil(low / step) * step
    return [first + k * step for k in range(int((high - first) / step + 1e-9) + 1)]


def bar_ticks(low, high, width, unit):
    """The labelled ticks of a colour bar `width` pixels wide for low..high, at round values
    (_ticks): [(tick's x, text, text's left x)], offsets from the bar's left end; the last
    carries the unit, each label lies within the bar and none overlaps the next (one that would
    is left out, from the right end's side)."""
    values = [v for v in _ticks(low, high, 4) if low <= v <= high] or [low]
    labelled, ticks = list(zip(values, tick_texts(values))), []
    for k, (v, text) in enumerate(labelled[::-1]):  # from the right: the unit's label is always kept
        text = f'{text} {unit}' if k == 0 else text
        x = (v - low) / (high - low) * (width - 1) if high > low else 0.0
        left = min(max(x - FONT.getlength(text) / 2, 0), width - FONT.getlength(text))
        if not ticks or left + FONT.getlength(text) + 6 <= ticks[-1][2]:
            ticks.append((x, text, left))
    return ticks[::-1]


def _colour_bar(draw, canvas, x, y, width, bar):
    """The colour map as a strip from low (left) to high (right), ticks at round values below it."""
    lut, low, high, unit = bar
    strip = Image.fromarray(np.repeat(lut[None], 8, axis=0)).resize((width, 8), Image.BILINEAR)
    canvas.paste(strip, (x, y + 2))
    draw.rectangle([x, y + 2, x + width - 1, y + 9], outline=(120, 120, 120))
    for offset, text, left in bar_ticks(low, high, width, unit):
        draw.line([x + offset, y + 10, x + offset, y + 12], fill='black')
        draw.text((x + left, y + 12), text, fill='black', font=FONT)


def save_figure(path, rows, title, legend=()):
    """Draw the figure: `title` on top, rows of Panel (None = empty cell) as a grid, each
    enlarged by panel_scale with its title above and its colour bar below, then the legend
    [(name, rgb)]. Written atomically as a PNG."""
    s, cell_w, cell_h, origin = figure_layout(rows)
    h, w = next(p for row in rows for p in row if p is not None).pixels.shape[:2]
    width = PAD + max(len(row) for row in rows) * cell_w
    lines = _legend_lines(legend, width)
    height = PAD + TITLE_HEIGHT + len(rows) * cell_h + (len(lines) * LEGEND_LINE + PAD if lines else 0)
    canvas = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, PAD), title, fill='black', font=FONT)
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            if panel is None:
                continue
            x, y = origin(r, c)
            draw.text((x, y - TITLE_HEIGHT), panel.title, fill='black', font=FONT)
            canvas.paste(Image.fromarray(panel.pixels).resize((w * s, h * s), Image.NEAREST), (x, y))
            for k, line in enumerate(panel.note):
                top = y + h * s / 2 + (k - len(panel.note) / 2) * LEGEND_LINE
                draw.text((x + (w * s - FONT.getlength(line)) / 2, top), line, fill='black', font=FONT)
            if panel.bar is not None:
                _colour_bar(draw, canvas, x, y + h * s, w * s, panel.bar)
    top = PAD + TITLE_HEIGHT + len(rows) * cell_h
    for k, line in enumerate(lines):
        for x, name, rgb in line:
            y = top + k * LEGEND_LINE
            draw.rectangle([x, y + 2, x + 10, y + 12], fill=tuple(int(v) for v in rgb), outline='black')
            draw.text((x + 14, y), name, fill='black', font=FONT)
    save_atomic(path, lambda f: canvas.save(f, format='PNG'))


# ---------------------------------------------------------------------------------------------
# the reliability diagram

def _count(n):
    return f'{n / 1e6:.1f}M' if n >= 1e6 else f'{n / 1e3:.0f}k' if n >= 1e4 else str(n)


def reliability_diagram(path, bins, ece, title):
    """The reliability diagram of the ECE bins: accuracy per bin as bars against the diagonal
    (perfect calibration), the bin's mean confidence as a red tick, its pixel count below."""
    width, height, left, right, top, bottom = 640, 536, 64, 20, 60, 84
    canvas = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(canvas)
    plot_w, plot_h = width - left - right, height - top - bottom
    px = lambda v: left + v * plot_w  # confidence -> x pixel
    py = lambda v: top + (1 - v) * plot_h  # accuracy -> y pixel
    edges = bins['edges']
    for m, (n, acc, conf) in enumerate(zip(bins['count'], bins['accuracy'], bins['confidence'])):
        x0, x1 = px(edges[m]) + 1, px(edges[m + 1]) - 1
        if n:
            draw.rectangle([x0, py(acc), x1, py(0)], fill=(90, 140, 210), outline=(30, 60, 120))
            draw.line([x0, py(conf), x1, py(conf)], fill=(200, 0, 0), width=3)
        label = _count(n)
        draw.text(((x0 + x1) / 2 - FONT.getlength(label) / 2, py(0) + 22), label, fill='black', font=FONT)
    for k in range(0, 40, 2):  # the diagonal, dashed: 20 dashes
        draw.line([px(k / 40), py(k / 40), px((k + 1) / 40), py((k + 1) / 40)], fill=(90, 90, 90), width=2)
    _axes(canvas, draw, px, py, 'confidence', 'accuracy')
    draw.text((6, py(0) + 22), 'pixels', fill='black', font=FONT)
    total = sum(bins['count'])
    ece_text = 'nan' if ece is None else f'{ece:.3f}'
    draw.text((left, 8), title, fill='black', font=FONT)
    draw.text((left, 24), f'Reliability: ECE {ece_text} over {total} labelled pixels, {len(edges) - 1} bins',
              fill='black', font=FONT)
    draw.text((left, 40), 'bars: accuracy   red: mean confidence   dashed: perfect calibration',
              fill=(60, 60, 60), font=FONT)
    save_atomic(path, lambda f: canvas.save(f, format='PNG'))


def _axes(canvas, draw, px, py, xlabel, ylabel, xticks=(0, 0.2, 0.4, 0.6, 0.8, 1.0),
          yticks=(0, 0.2, 0.4, 0.6, 0.8, 1.0), to_x=lambda v: v, to_y=lambda v: v):
    """A box with ticks and labels; px/py map plot coordinates in [0, 1] to pixels, to_x/to_y
    map a tick's value to plot coordinates."""
    draw.rectangle([px(0), py(1), px(1), py(0)], outline='black')
    for v, text in zip(xticks, tick_texts(xticks)):
        draw.line([px(to_x(v)), py(0), px(to_x(v)), py(0) + 4], fill='black')
        draw.text((px(to_x(v)) - 8, py(0) + 6), text, fill='black', font=FONT)
    for v, text in zip(yticks, tick_texts(yticks)):
        draw.line([px(0) - 4, py(to_y(v)), px(0), py(to_y(v))], fill='black')
        draw.text((px(0) - 8 - FONT.getlength(text), py(to_y(v)) - 7), text, fill='black', font=FONT)
    draw.text((px(0.5) - FONT.getlength(xlabel) / 2, py(0) + 40), xlabel, fill='black', font=FONT)
    _vertical_text(canvas, ylabel, 4, py(0.5))


def _vertical_text(canvas, text, x, middle):
    """`text` turned a quarter to the left (read from bottom to top), its left edge at x, its
    middle at the height `middle`: a y axis's label."""
    strip = Image.new('RGB', (int(FONT.getlength(text)) + 4, 14), 'white')
    ImageDraw.Draw(strip).text((0, 0), text, fill='black', font=FONT)
    canvas.paste(strip.rotate(90, expand=True), (int(x), int(middle - strip.width / 2)))


# ---------------------------------------------------------------------------------------------
# line plots

LINE_COLOURS = [(31, 119, 180), (214, 39, 40), (127, 127, 127), (44, 160, 44), (255, 127, 14),
                (148, 103, 189), (140, 86, 75), (227, 119, 194)]  # matplotlib's first eight, reordered
# series k is drawn in colour k, marker k and dash k (each list repeats when it runs out): where
# lines coincide the earlier one, drawn first and wider, shows through the gaps of the later
# one's dashes and beside them, and markers of different shapes and sizes stay visible
MARKERS = (('circle', 6), ('square', 4), ('triangle', 6), ('diamond', 4), ('cross', 5))  # shape, half-width
DASHES = ((None, 3), ((8, 6), 2), ((2, 4), 2), ((8, 4, 2, 4), 2))  # (pixels on, off, ... or None: solid), width


MARKED = 12  # the most markers on one line
PLOT_W, PLOT_H, PLOT_LEFT, PLOT_TOP, PLOT_BOTTOM = 300, 220, 76, 40, 44  # a panel's plot area and its margins


def series_style(k):
    """(colour, marker, dash) of the k-th series of a plot."""
    return LINE_COLOURS[k % len(LINE_COLOURS)], MARKERS[k % len(MARKERS)], DASHES[k % len(DASHES)]


def _polyline(draw, points, colour, dash):
    """A line through `points`; dash = (pattern, width): a solid line for pattern None, else
    (on, off, on, off, ...) in pixels, running on across the corners."""
    dash, width = dash
    if dash is None:
        draw.line(points, fill=colour, width=width, joint='curve')
        return
    k, left = 0, dash[0]  # the pattern's current entry and what is left of it
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        length, done = math.hypot(x1 - x0, y1 - y0), 0.0
        while done < length:
            step = min(left, length - done)
            if k % 2 == 0:  # an 'on' entry
                a, b = done / length, (done + step) / length
                draw.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))],
                          fill=colour, width=width)
            done, left = done + step, left - step
            if left <= 0:
                k = (k + 1) % len(dash)
                left = dash[k]


def _marker(draw, x, y, marker, colour):
    """An outlined marker, (shape, half-width r), centred on (x, y)."""
    marker, r = marker
    if marker == 'circle':
        draw.ellipse([x - r, y - r, x + r, y + r], outline=colour, width=2)
    elif marker == 'square':
        draw.rectangle([x - r, y - r, x + r, y + r], outline=colour, width=2)
    elif marker == 'triangle':
        draw.polygon([(x, y - r - 2), (x + r + 1, y + r), (x - r - 1, y + r)], outline=colour, width=2)
    elif marker == 'diamond':
        draw.polygon([(x, y - r - 2), (x + r + 2, y), (x, y + r + 2), (x - r - 2, y)], outline=colour, width=2)
    else:  # cross
        draw.line([x - r, y - r, x + r, y + r], fill=colour, width=2)
        draw.line([x - r, y + r, x + r, y - r], fill=colour, width=2)


def log_ticks(low, high):
    """Tick values 1, 2, 5 times the powers of ten within [low, high] (both > 0), for a log axis;
    where fewer than two fall inside, about three round values of one step (_ticks)."""
    ticks = [m * 10 ** e for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
             for m in (1, 2, 5) if low <= m * 10 ** e <= high]
    return ticks if len(ticks) >= 2 else _ticks(low, high, 3)


def tick_texts(values):
    """The ticks' labels: 3 significant digits, or as many more (up to 6) as it takes for every
    label to read as its value (ticks 0.8535 and 0.85375 would both read 0.854)."""
    for digits in range(3, 7):
        texts = [f'{v:.{digits}g}' for v in values]
        if all(abs(float(t) - v) <= 1e-9 * max(1.0, abs(v)) for t, v in zip(texts, values)):
            break
    return texts


def line_plots(path, panels, title, columns=4, log_x=False):
    """Panels in rows of `columns`, each (panel title, x label, y label, [(name, xs, ys)]) with
    one line per series (None in ys: no point), marked at every point, or at about MARKED of
    them where it has more; the y label, with its unit, turned along the y axis. A series keeps
    its series_style in every panel, and the legend below shows it; `title` on top. log_x: the x
    axis on a log scale (every x > 0). Written atomically as a PNG."""
    names = list(dict.fromkeys(name for *_, series in panels for name, _, _ in series))
    style = {name: series_style(k) for k, name in enumerate(names)}
    pw, ph, left, top, bottom = PLOT_W, PLOT_H, PLOT_LEFT, PLOT_TOP, PLOT_BOTTOM
    columns = min(columns, len(panels))
    rows = -(-len(panels) // columns)
    canvas = Image.new('RGB', (columns * (left + pw + 20), rows * (top + ph + bottom) + 18 * len(names) + PAD), 'white')
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, PAD), title, fill='black', font=FONT)
    for p, (panel_title, xlabel, ylabel, series) in enumerate(panels):
        x0, y0 = p % columns * (left + pw + 20) + left, p // columns * (top + ph + bottom) + top
        points = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys) if y is not None]
        xs_all, ys_all = [x for x, _ in points] or [1, 2], [y for _, y in points] or [0, 1]
        (xl, xh), (yl, yh) = (min(xs_all), max(xs_all)), (min(ys_all), max(ys_all))
        yl, yh = yl - 0.05 * (yh - yl or 1), yh + 0.05 * (yh - yl or 1)
        if log_x:  # a tenth of a decade of room at each end
            xl, xh = xl / 10 ** 0.1, (xh if xh > xl else xl) * 10 ** 0.1
        xh = xh if xh > xl else xl + 1
        at = (lambda v: math.log10(v)) if log_x else (lambda v: v)
        px = lambda v: x0 + (at(v) - at(xl)) / (at(xh) - at(xl)) * pw
        py = lambda v: y0 + (1 - (v - yl) / (yh - yl)) * ph
        draw.text((x0, y0 - 16), panel_title, fill='black', font=FONT)
        yticks = _ticks(yl, yh)
        for v, text in zip(yticks, tick_texts(yticks)):
            draw.line([x0, py(v), x0 + pw, py(v)], fill=(230, 230, 230))
            draw.text((x0 - 6 - FONT.getlength(text), py(v) - 7), text, fill='black', font=FONT)
        xticks = log_ticks(xl, xh) if log_x else _ticks(xl, xh)
        for v, text in zip(xticks, tick_texts(xticks)):
            draw.line([px(v), y0 + ph, px(v), y0 + ph + 4], fill='black')
            draw.text((px(v) - FONT.getlength(text) / 2, y0 + ph + 6), text, fill='black', font=FONT)
        draw.rectangle([x0, y0, x0 + pw, y0 + ph], outline='black')
        draw.text((x0 + pw / 2 - FONT.getlength(xlabel) / 2, y0 + ph + 22), xlabel, fill='black', font=FONT)
        _vertical_text(canvas, ylabel, x0 - left + 4, y0 + ph / 2)
        for name, xs, ys in series:
            colour, marker, dash = style[name]
            line = [(px(x), py(y)) for x, y in zip(xs, ys) if y is not None]
            if len(line) > 1:
                _polyline(draw, line, colour, dash)
            for x, y in line[::max(1, math.ceil(len(line) / MARKED))]:  # none where every y is None
                _marker(draw, x, y, marker, colour)
    for k, name in enumerate(names):
        colour, marker, dash = style[name]
        y = rows * (top + ph + bottom) + 18 * k
        _polyline(draw, [(left, y + 7), (left + 36, y + 7)], colour, dash)
        _marker(draw, left + 18, y + 7, marker, colour)
        draw.text((left + 44, y), name, fill='black', font=FONT)
    save_atomic(path, lambda f: canvas.save(f, format='PNG'))
