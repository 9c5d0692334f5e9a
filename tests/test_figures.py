"""figures.py and compare.py, the outputs that explain themselves: a map with nothing to show says
so, colour bars carry round ticks, coinciding lines stay visible, a y label sits at its axis;
compare.py names the files it writes and refuses, in one line, a file that is no evaluate.py
result."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import compare
import data
import evaluate
import figures
import uq
from heads import build_model
from test_evaluate import K, SIZE


def panels_and_figure(tmp_path, members):
    """The Figure-5 panels of one synthetic scene predicted by `members` random networks (one:
    a single network; more: a Deep Ensemble), and the PNG that save_figure draws of them."""
    scene = data.build_dataset('synthetic', None, 'val', train=False, num_images=1, size=SIZE)[0]
    image, label, depth = scene['image'][None], scene['label'][None], scene['depth'][None]
    models = []
    for seed in range(members):
        torch.manual_seed(seed)
        models.append(build_model('segdepthformer', 'b0', K).eval())
    with torch.no_grad():
        pred = (uq.predict(models[0], image, decompose=True) if members == 1 else
                uq.predict(models, image, method='de', decompose=True))
    rows = figures.prediction_panels(image, pred, 0, data.PALETTES['synthetic'], K, label, depth)
    figures.save_figure(tmp_path / 'f.png', rows, 'title', figures.BLACK_MEANS)
    return rows, np.array(Image.open(tmp_path / 'f.png').convert('RGB'))


def test_a_map_with_nothing_to_show_says_so_instead_of_painting_black(tmp_path):
    rows, figure = panels_and_figure(tmp_path, 1)
    s, _, _, origin = figures.figure_layout(rows)
    h, w = SIZE[0] * s, SIZE[1] * s
    # a single network's epistemic parts are zero at every pixel: blank panels with the note
    for r, c, title in ((0, 6, 'epistemic: mutual information'), (1, 6, 'epistemic std')):
        panel = rows[r][c]
        assert panel.title == title and panel.note == figures.ZERO_NOTE and panel.bar is None
        assert (panel.pixels == figures.BLANK).all()
        x, y = origin(r, c)
        shown = figure[y:y + h, x:x + w].astype(int)
        dark = shown.sum(-1) < 200
        # the panel is light, not black, and the note is written on it, in its middle third
        assert (shown == figures.BLANK).all(-1).mean() > 0.8 and dark.any()
        rows_with_text = np.flatnonzero(dark.any(1))
        assert h / 3 < rows_with_text.min() and rows_with_text.max() < 2 * h / 3
    # an ensemble's epistemic parts are maps with colour bars like the others
    rows, _ = panels_and_figure(tmp_path, 2)
    assert all(not row[6].note and row[6].bar is not None for row in rows)


def test_colour_bars_carry_round_ticks_between_their_ends(tmp_path):
    ticks = figures.bar_ticks(0, math.log(7), 200, 'nats')
    assert [text for _, text, _ in ticks] == ['0', '0.5', '1', '1.5 nats']
    for (x, _, _), v in zip(ticks, (0, 0.5, 1, 1.5)):
        assert x == pytest.approx(v / math.log(7) * 199)
    lefts = [left for _, _, left in ticks]
    ends = [left + figures.FONT.getlength(text) for _, text, left in ticks]
    assert lefts[0] >= 0 and ends[-1] <= 200 and all(e + 6 <= l for e, l in zip(ends, lefts[1:]))
    # a label that would overlap its right neighbour is left out; the unit's label stays
    crowded = figures.bar_ticks(0.0, 1.0, 60, 'm')
    assert 2 <= len(crowded) < len(figures.bar_ticks(0.0, 1.0, 200, 'm')) and crowded[-1][1] == '1 m'
    # in the figure: a tick mark below the strip at each, black
    rows, figure = panels_and_figure(tmp_path, 1)
    s, _, _, origin = figures.figure_layout(rows)
    x, y = origin(0, 4)  # the entropy, 0..log K nats
    below = y + SIZE[0] * s + 11
    marks = [x + round(offset) for offset, _, _ in figures.bar_ticks(0, math.log(K), SIZE[1] * s, 'nats')]
    assert len(marks) > 2 and all(figure[below, m].sum() < 150 for m in marks)


def test_coinciding_lines_stay_visible_with_their_own_markers_and_dashes(tmp_path):
    styles = [figures.series_style(k) for k in range(4)]
    assert len({marker for _, marker, _ in styles}) == 4 and len({dash for _, _, dash in styles}) == 4
    xs, ys = list(range(6)), [0.5, 0.6, 0.8, 0.7, 0.9, 1.0]
    figures.line_plots(tmp_path / 'p.png', [('RMSE', 'severity', 'RMSE (m)', [('a', xs, ys), ('b', xs, ys)])], 't')
    plot = np.array(Image.open(tmp_path / 'p.png').convert('RGB'))
    area = plot[figures.PLOT_TOP:figures.PLOT_TOP + figures.PLOT_H,
                figures.PLOT_LEFT:figures.PLOT_LEFT + figures.PLOT_W]
    first, second = (int((area == styles[k][0]).all(-1).sum()) for k in (0, 1))
    # 'b' drawn exactly over 'a': both colours still cover hundreds of pixels
    assert first > 300 and second > 300, (first, second)


def test_the_y_label_sits_at_its_axis(tmp_path):
    xs = [0, 0.5, 1]
    for name, ylabel in (('with', 'RMSE (m)'), ('without', '')):
        figures.line_plots(tmp_path / f'{name}.png', [('RMSE (m): AUSE 0.1', 'fraction', ylabel,
                                                       [('curve', xs, [3, 2, 1])])], 't')
    with_label, without = (np.array(Image.open(tmp_path / f'{n}.png').convert('L')) for n in ('with', 'without'))
    rows, cols = np.nonzero(with_label != without)
    # the label's pixels: left of the y axis's tick labels, beside the plot's middle, and upright
    assert cols.max() < 24 and figures.PLOT_TOP < rows.min() and rows.max() < figures.PLOT_TOP + figures.PLOT_H
    assert abs((rows.min() + rows.max()) / 2 - (figures.PLOT_TOP + figures.PLOT_H / 2)) <= 2
    assert rows.max() - rows.min() > 3 * (cols.max() - cols.min())


def sweep_report(name, value):
    """A sweep's JSON (evaluate.py --corruption all) with every metric at `value`."""
    return {'name': name, 'method': 'none', 'checkpoints': ['x.pt'], 'cells': {},
            'summary': {header: [value] * 6 for *_, header in evaluate.SWEEP_METRICS}}


def test_compare_names_the_plot_it_writes(tmp_path, capsys):
    paths = []
    for name in ('baseline', 'calibrated'):
        paths.append(tmp_path / f'sweep_{name}.json')
        paths[-1].write_text(json.dumps(sweep_report(name, 0.5)))
    plot = tmp_path / 'figs' / 'sweep.png'
    (table,) = compare.main([*map(str, paths), '--plot', str(plot)])
    printed = capsys.readouterr().out
    assert printed.splitlines()[-1] == f'wrote {plot}' and Image.open(plot).size[0] > 0
    assert table.startswith('Corruption sweeps: severity 0 is the clean images, 1..5 the mean over the 10 '
                            'corruptions at that severity')
    assert table in printed and table.count('| baseline |') == 6


@pytest.mark.parametrize('content, what', [
    ({'checkpoint': 'best.pt', 'temperature': 1.2, 'variance_scale': 0.6, 'num_classes': K},
     'a calibration written by calibrate.py'),
    ({'label': 'B0', 'method': 'none', 'images': [], 'skipped': []}, "predict.py's record of its outputs"),
    ([1, 2, 3], 'a JSON file of another kind')])
def test_compare_refuses_a_file_that_is_no_evaluate_result_naming_it(tmp_path, content, what):
    path = tmp_path / 'x.json'
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError) as error:
        compare.main([str(path)])
    assert str(error.value) == f'{path} is {what}, not an evaluate.py result (its --json)'
    with pytest.raises(ValueError, match=f'cannot read {tmp_path}/missing.json'):
        compare.main([str(tmp_path / 'missing.json')])


def test_compare_plot_without_a_sweep_is_refused_before_anything_is_written(tmp_path):
    path = tmp_path / 'x.json'
    path.write_text(json.dumps({'name': 'B0', 'seg': None, 'depth': None, 'time_ms': {'mean': 1.0}}))
    plot = tmp_path / 'figs' / 'sweep.png'
    with pytest.raises(ValueError, match='--plot draws corruption sweeps'):
        compare.main([str(path), '--plot', str(plot)])
    assert not plot.parent.exists()


def test_log_ticks_are_one_two_five_times_the_powers_of_ten():
    assert figures.log_ticks(0.8, 12) == [1, 2, 5, 10]
    # fewer than two inside: round values of one step, 1 among them where it lies inside
    assert figures.log_ticks(1.1, 1.5) == pytest.approx([1.2, 1.4])
    assert figures.log_ticks(0.766, 1.26) == pytest.approx([0.8, 1.0, 1.2])


def test_tick_labels_are_told_apart():
    assert figures.tick_texts([0.2, 0.4, 1.0]) == ['0.2', '0.4', '1']
    # ticks 0.00025 apart: with 3 significant digits all four would read 0.854
    assert figures.tick_texts([0.8535, 0.85375, 0.854, 0.85425]) == ['0.8535', '0.85375', '0.854', '0.85425']
    assert figures.tick_texts([0.1 + 0.2]) == ['0.3']  # a float's last bits are no digit to show


def evaluation(name, method, ms, batch_size=1, ood=False, calibration=None, ece=0.1):
    """An evaluate.py result with what --cost-plot reads."""
    return {'name': name, 'method': method, 'time_ms': {'mean': ms}, 'settings': {'batch_size': batch_size,
                                                                                    'calibration': calibration},
            'seg': {'ece': ece, 'auroc_failure': 0.8}, 'depth': {'ause_rmse': 0.2, 'nll': 1.0},
            'ood': {'entropy': {'auroc': 0.9}, 'depth_var': {'auroc': 0.7}, 'mutual_information': None} if ood else None}


def test_a_models_clean_and_ood_rows_are_told_apart(tmp_path):
    results = [evaluation('B0', 'none', 10.0), evaluation('B0', 'none', 20.0, ood=True)]
    paths = [tmp_path / 'clean.json', tmp_path / 'ood.json']
    for path, r in zip(paths, results):
        path.write_text(json.dumps(r))
    tables = compare.main(list(map(str, paths)))
    assert [line.split(' | ')[0] for line in tables[0].splitlines()[2:]] == ['| B0', '| B0, OOD data']
    assert tables[-1].splitlines()[2].startswith('| B0, OOD data | ')  # the OOD table names it alike
    assert compare.row_names(results[1:]) == ['B0']  # no clean result beside it: no mark
    # two results of one kind under one name: refused, naming both files
    (tmp_path / 'again.json').write_text(json.dumps(results[0]))
    with pytest.raises(ValueError, match=f"{paths[0]}, {tmp_path / 'again.json'} share the row name 'B0'"):
        compare.main([str(paths[0]), str(tmp_path / 'again.json')])


def test_cost_plot_puts_each_result_at_its_time_over_one_networks(tmp_path, monkeypatch, capsys):
    results = [evaluation('B0', 'none', 10.0), evaluation('B0, calibrated', 'none', 11.0, calibration='ab12'),
               evaluation('DE x3', 'de', 60.0, batch_size=2, ece=0.05),
               evaluation('B0 on OOD', 'none', 20.0, ood=True), evaluation('DE x3 on OOD', 'de', 50.0, ood=True)]
    paths = []
    for k, r in enumerate(results):
        paths.append(tmp_path / f'{k}.json')
        paths[-1].write_text(json.dumps(r))
    drawn = {}
    monkeypatch.setattr(figures, 'line_plots', lambda path, panels, title, columns, log_x: drawn.update(
        panels={title: series for title, _, _, series in panels}, log_x=log_x,
        x_labels={title: x_label for title, x_label, _, _ in panels}))
    compare.main([*map(str, paths), '--cost-plot', str(tmp_path / 'cost.png')])
    # clean results against the clean single network (10 ms), the DE's 60 ms for a batch of 2;
    # results with an 'ood' block against the OOD single network (20 ms), in the OOD panels only
    # each panel names the single network it is measured against: the clean one, or the OOD one
    assert drawn['x_labels']['seg ECE'] == "time per image / B0's"
    assert drawn['x_labels']['OOD AUROC by entropy'] == "time per image / B0 on OOD's"
    assert drawn['log_x'] and drawn['panels']['seg ECE'] == [('B0', [1.0], [0.1]), ('B0, calibrated', [1.1], [0.1]),
                                                             ('DE x3', [3.0], [0.05])]
    assert drawn['panels']['OOD AUROC by depth variance'] == [('B0 on OOD', [1.0], [0.7]), ('DE x3 on OOD', [2.5], [0.7])]
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {tmp_path / 'cost.png'}"
    # without the single network of a kind there is nothing to measure cost against
    with pytest.raises(ValueError, match='give the result of method none, uncalibrated, without --synthetic-ood'):
        compare.main([str(paths[2]), '--cost-plot', str(tmp_path / 'other.png')])
    assert not (tmp_path / 'other.png').exists()
