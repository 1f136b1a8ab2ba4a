"""Outputs of the label-efficiency study: results CSV, summary, label savings, Markdown and plot.

The study fine-tunes on a grid of task ('vcf', 'worldcover') x label fraction x initialisation
('pretrained' MAE encoder or 'scratch') x seed and evaluates on test regions, one inside the
pretraining regions (e.g. 'europe') and one outside (e.g. 'south_america'). Each run gives one row
(a dict) with the keys ``task, region, fraction, init, seed`` and the task's headline metric
(``HEADLINE``); rows may carry extra columns (mae, r2, overall_accuracy, lr, best_step, ...).

The study driver calls :func:`write_report` once; the other functions are its parts. Pure host
code: numpy, csv and matplotlib (Agg canvas, no pyplot).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import re
from typing import Any, Iterable, Mapping, Sequence

from etils import epath
import matplotlib.figure
from matplotlib.backends import backend_agg
import numpy as np

from data_pipeline import atomic
from data_pipeline import render
from data_pipeline import schema


@dataclasses.dataclass(frozen=True)
class Headline:
  """The metric a task is judged by."""
  metric: str  # column name in the rows
  higher_is_better: bool
  axis_label: str  # name and units, for plots and the Markdown legend
  title: str  # task name for humans
  digits: int  # decimals in the Markdown table


# The one place that says which metric each task reports and which direction is better.
HEADLINE = {
    'vcf': Headline('rmse', higher_is_better=False, axis_label='RMSE (pp)', title='VCF',
                    digits=2),
    'worldcover': Headline('miou', higher_is_better=True, axis_label='mIoU', title='WorldCover',
                           digits=3),
}
INITS = ('pretrained', 'scratch')
FRACTIONS = (0.001, 0.01, 0.1, 1.0)
KEY_COLUMNS = ('task', 'region', 'fraction', 'init', 'seed')
# Columns written first, in this order; any others follow sorted by name.
KNOWN_COLUMNS = KEY_COLUMNS + tuple(h.metric for h in HEADLINE.values())

SummaryKey = tuple[str, str, float, str]  # (task, region, fraction, init)

# --- CSV -------------------------------------------------------------------------------------


def _format_cell(value: Any) -> str:
  if value is None:
    return ''
  if isinstance(value, (float, np.floating)):
    return repr(float(value))  # shortest text that reads back to the same float
  if isinstance(value, np.integer):
    return str(int(value))
  return str(value)


_INT = re.compile(r'[+-]?\d+')


def _parse_cell(text: str) -> Any:
  if _INT.fullmatch(text):
    return int(text)
  try:
    return float(text)
  except ValueError:
    return text


def columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
  """The CSV column order: KNOWN_COLUMNS first, then the other keys sorted."""
  keys = set().union(*(row.keys() for row in rows))
  return [c for c in KNOWN_COLUMNS if c in keys] + sorted(keys - set(KNOWN_COLUMNS))


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
  """Writes rows as CSV, atomically (temporary file in the same folder, then a rename).

  Missing values are written as empty cells; floats with ``repr`` so they read back exactly.
  The folder must exist.
  """
  fieldnames = columns(rows)
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=fieldnames, lineterminator='\n')
  writer.writeheader()
  for row in rows:
    writer.writerow({key: _format_cell(value) for key, value in row.items()})
  atomic.write_bytes(path, buffer.getvalue().encode('utf-8'))


def read_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads rows written by :func:`write_csv`; integers and floats come back as numbers.

  Empty cells are left out of the row dicts, so rows round-trip.
  """
  reader = csv.DictReader(io.StringIO(epath.Path(path).read_text()))
  return [{key: _parse_cell(text) for key, text in row.items() if text != ''} for row in reader]


# --- Summary and label savings --------------------------------------------------------------


def _check_row(row: Mapping[str, Any]) -> Headline:
  missing = [key for key in KEY_COLUMNS if key not in row]
  if missing:
    raise ValueError(f'study row lacks {missing}: {dict(row)}')
  if row['task'] not in HEADLINE:
    raise ValueError(f'unknown task {row["task"]!r} (known: {sorted(HEADLINE)}): {dict(row)}')
  if row['init'] not in INITS:
    raise ValueError(f'unknown init {row["init"]!r} (known: {INITS}): {dict(row)}')
  headline = HEADLINE[row['task']]
  if headline.metric not in row:
    raise ValueError(f'{row["task"]} row lacks its headline metric {headline.metric!r}: '
                     f'{dict(row)}')
  return headline


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[SummaryKey, dict[str, Any]]:
  """Statistics of the headline metric over seeds, per (task, region, fraction, init).

  Returns:
    (task, region, fraction, init) -> dict with ``metric`` (its name), ``mean``, ``std`` (sample
    standard deviation over seeds, ddof=1; NaN for a single seed), ``min``, ``max`` and
    ``n_seeds``. A NaN metric (a diverged run) is kept, so the cell's mean shows as NaN rather
    than silently averaging fewer seeds.

  Raises:
    ValueError: On malformed rows or two rows for the same (task, region, fraction, init, seed).
  """
  values: dict[SummaryKey, list[float]] = {}
  seen = set()
  for row in rows:
    headline = _check_row(row)
    run = tuple(row[key] for key in KEY_COLUMNS)
    if run in seen:
      raise ValueError(f'duplicate study row for (task, region, fraction, init, seed) = {run}')
    seen.add(run)
    key = (row['task'], row['region'], float(row['fraction']), row['init'])
    values.setdefault(key, []).append(float(row[headline.metric]))
  summary = {}
  for key in sorted(values, key=_sort_key):
    v = np.asarray(values[key], np.float64)
    summary[key] = {
        'metric': HEADLINE[key[0]].metric,
        'mean': float(v.mean()),
        'std': float(v.std(ddof=1)) if v.size > 1 else float('nan'),
        'min': float(v.min()),
        'max': float(v.max()),
        'n_seeds': int(v.size),
    }
  return summary


def _region_order(region: str) -> tuple[int, str]:
  return (schema.REGIONS.index(region) if region in schema.REGIONS else len(schema.REGIONS),
          region)


def _sort_key(key: SummaryKey):
  task, region, fraction, init = key
  return (list(HEADLINE).index(task), _region_order(region), fraction, INITS.index(init))


def _panels(summary: Mapping[SummaryKey, Any]) -> tuple[list[str], list[str]]:
  """Tasks (HEADLINE order) and regions (schema.REGIONS order) present in a summary."""
  tasks = sorted({k[0] for k in summary}, key=list(HEADLINE).index)
  regions = sorted({k[1] for k in summary}, key=_region_order)
  return tasks, regions


def _curve(summary: Mapping[SummaryKey, Any], task: str, region: str,
           init: str) -> tuple[np.ndarray, np.ndarray]:
  """(fractions ascending, mean metric) of one initialisation."""
  points = sorted((k[2], s['mean']) for k, s in summary.items()
                  if k[0] == task and k[1] == region and k[3] == init)
  return (np.asarray([p[0] for p in points], np.float64),
          np.asarray([p[1] for p in points], np.float64))


def label_savings(summary: Mapping[SummaryKey, Any], task: str,
                  region: str) -> dict[float, dict[str, Any]]:
  """How many times fewer labels the pretrained model needs to match the scratch model.

  For each fraction f of the scratch curve, with scratch mean m_s(f): f* is the smallest fraction
  at which the pretrained mean curve, interpolated linearly in log10(fraction) between its grid
  points, reaches m_s(f) ('reaches' = <= for lower-is-better metrics, >= otherwise). Segments are
  scanned in increasing fraction, so a non-monotone curve gives its first crossing.

  Returns:
    f -> dict with ``factor``, ``bound``, ``f_star`` and ``scratch`` (= m_s(f)), where
    ``bound`` is one of:

    * 'exact': f* lies on the pretrained grid's range; ``factor`` = f / f* (below 1 when the
      pretrained model is worse).
    * 'lower': the pretrained model at the smallest grid fraction f_min already reaches m_s(f),
      so f* <= f_min is not bracketed; ``factor`` = f / f_min is a lower bound, ``f_star`` None.
    * 'not reached': the pretrained curve does not reach m_s(f) up to the largest grid fraction
      f_max; ``factor`` and ``f_star`` are None. If it reaches it at all, it is beyond f_max, so
      the factor is below ``upper`` = f / f_max (also returned).
    * 'undefined': m_s(f) is NaN (a diverged scratch run) or every pretrained mean is NaN;
      ``factor`` None.

    Pretrained grid points with a NaN mean are left out of the curve.
  """
  if task not in HEADLINE:
    raise ValueError(f'unknown task {task!r} (known: {sorted(HEADLINE)})')
  higher = HEADLINE[task].higher_is_better
  scratch_f, scratch_m = _curve(summary, task, region, 'scratch')
  pre_f, pre_m = _curve(summary, task, region, 'pretrained')
  if not scratch_f.size or not pre_f.size:
    raise ValueError(f'label_savings needs pretrained and scratch results for {task}/{region}')
  finite = np.isfinite(pre_m)
  pre_f, pre_m = pre_f[finite], pre_m[finite]
  log_f = np.log10(pre_f)

  def reaches(value: float, target: float) -> bool:
    return value >= target if higher else value <= target

  out = {}
  for f, target in zip(scratch_f.tolist(), scratch_m.tolist()):
    result = {'factor': None, 'bound': 'not reached', 'f_star': None, 'scratch': target,
              'upper': f / pre_f[-1] if pre_f.size else None}
    if not math.isfinite(target) or not pre_f.size:
      result.update(bound='undefined', upper=None)
    elif reaches(pre_m[0], target):
      result.update(factor=f / pre_f[0], bound='lower', upper=None)
    else:
      for i in range(1, pre_f.size):
        if reaches(pre_m[i], target):
          # pre_m[i - 1] does not reach the target and pre_m[i] does, so they differ and the
          # straight segment between them crosses the target once, at t in (0, 1].
          t = (target - pre_m[i - 1]) / (pre_m[i] - pre_m[i - 1])
          f_star = float(10**(log_f[i - 1] + t * (log_f[i] - log_f[i - 1])))
          result.update(factor=f / f_star, bound='exact', f_star=f_star, upper=None)
          break
    out[f] = result
  return out


def all_label_savings(summary: Mapping[SummaryKey, Any]) -> dict[tuple[str, str], dict]:
  """:func:`label_savings` for every (task, region) with both initialisations."""
  out = {}
  tasks, regions = _panels(summary)
  for task in tasks:
    for region in regions:
      inits = {k[3] for k in summary if k[0] == task and k[1] == region}
      if inits == set(INITS):
        out[(task, region)] = label_savings(summary, task, region)
  return out


# --- Markdown --------------------------------------------------------------------------------


def format_factor(saving: Mapping[str, Any] | None) -> str:
  """'12.3x' (exact), '>10x' (lower bound), 'n/r' (not reached), 'n/a' (undefined or missing)."""
  if saving is None or saving['bound'] == 'undefined':
    return 'n/a'
  if saving['bound'] == 'not reached':
    return 'n/r'
  factor = saving['factor']
  text = f'{factor:.0f}' if factor >= 100 else f'{factor:.3g}'
  return ('>' if saving['bound'] == 'lower' else '') + text + 'x'


def _format_percent(fraction: float) -> str:
  return f'{100 * fraction:g}'


def _format_stat(stat: Mapping[str, Any] | None, digits: int) -> str:
  if stat is None:
    return '–'
  text = f'{stat["mean"]:.{digits}f}'
  if math.isfinite(stat['std']):
    text += f' ± {stat["std"]:.{digits}f}'
  return text


def markdown_table(summary: Mapping[SummaryKey, Any],
                   savings: Mapping[tuple[str, str], Mapping[float, Any]]) -> str:
  """One Markdown table per task: rows (region, labels %), pretrained vs scratch, savings.

  Args:
    summary: From :func:`summarise`.
    savings: (task, region) -> :func:`label_savings` output, e.g. from :func:`all_label_savings`.
  """
  tasks, regions = _panels(summary)
  parts = []
  for task in tasks:
    headline = HEADLINE[task]
    seeds = sorted({s['n_seeds'] for k, s in summary.items() if k[0] == task})
    n_seeds = str(seeds[0]) if len(seeds) == 1 else f'{seeds[0]}–{seeds[-1]}'
    direction = 'higher' if headline.higher_is_better else 'lower'
    parts += [
        f'### {headline.title}: {headline.axis_label}',
        '',
        f'{headline.axis_label}, {direction} is better; mean ± sample std (ddof=1) over '
        f'seeds (n = {n_seeds}). Difference = pretrained − scratch. Label savings = f / f*, '
        'where f* is the fraction at which the pretrained curve (linear in log10 fraction) '
        "reaches the scratch mean at f; '>Nx' = reached already at the smallest fraction "
        "(lower bound), 'n/r' = not reached within the grid.",
        '',
        '| Region | Labels (%) | Pretrained | Scratch | Difference | Label savings |',
        '|---|---:|---:|---:|---:|---:|',
    ]
    for region in regions:
      fractions = sorted({k[2] for k in summary if k[0] == task and k[1] == region})
      for fraction in fractions:
        pre = summary.get((task, region, fraction, 'pretrained'))
        scr = summary.get((task, region, fraction, 'scratch'))
        diff = (f'{pre["mean"] - scr["mean"]:+.{headline.digits}f}'
                if pre is not None and scr is not None else '–')
        saving = savings.get((task, region), {}).get(fraction)
        parts.append(f'| {region} | {_format_percent(fraction)} | '
                     f'{_format_stat(pre, headline.digits)} | '
                     f'{_format_stat(scr, headline.digits)} | {diff} | {format_factor(saving)} |')
    parts.append('')
  return '\n'.join(parts)


# --- Plot ------------------------------------------------------------------------------------

_STYLE = {'pretrained': dict(color='tab:blue', marker='o'),
          'scratch': dict(color='tab:orange', marker='s')}


def plot_study(summary: Mapping[SummaryKey, Any], path: str | os.PathLike | None = None, *,
               panel_inches: tuple[float, float] = (4.0, 3.0),
               dpi: int = 150) -> matplotlib.figure.Figure:
  """Plots headline metric vs label percentage: one panel per (task, region).

  Rows are tasks, columns regions; each panel has the pretrained and scratch mean curves with
  markers and a band spanning their min–max over seeds, on a log x axis.

  Args:
    summary: From :func:`summarise`.
    path: Where to write the PNG (parent folders are created); None to only return the figure.
    panel_inches: (width, height) of one panel.
    dpi: Resolution of the PNG.

  Returns:
    The figure (a bare Figure with an Agg canvas; nothing is registered with pyplot).
  """
  tasks, regions = _panels(summary)
  if not tasks:
    raise ValueError('plot_study: empty summary')
  # A bare Figure with its own Agg canvas: no pyplot, so no global backend switch and no
  # figure registry to leak figures (as in mae_jax/plots.py).
  figure = matplotlib.figure.Figure(
      figsize=(panel_inches[0] * len(regions), panel_inches[1] * len(tasks)), dpi=dpi,
      facecolor='white')
  canvas = backend_agg.FigureCanvasAgg(figure)
  axes = figure.subplots(len(tasks), len(regions), squeeze=False)
  for row, task in enumerate(tasks):
    headline = HEADLINE[task]
    for col, region in enumerate(regions):
      ax = axes[row, col]
      ax.set_title(f'{headline.title} — {region}', fontsize=10)
      keys = [k for k in summary if k[0] == task and k[1] == region]
      if not keys:
        ax.text(0.5, 0.5, 'no results', ha='center', va='center', transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        continue
      for init in INITS:
        stats = sorted((k[2], summary[k]) for k in keys if k[3] == init)
        if not stats:
          continue
        percent = np.asarray([100 * f for f, _ in stats])
        ax.plot(percent, [s['mean'] for _, s in stats], label=init, **_STYLE[init])
        ax.fill_between(percent, [s['min'] for _, s in stats], [s['max'] for _, s in stats],
                        color=_STYLE[init]['color'], alpha=0.2, linewidth=0)
      ax.set_xscale('log')
      ticks = sorted({100 * k[2] for k in keys})
      ax.set_xticks(ticks, [f'{t:g}' for t in ticks])
      ax.minorticks_off()
      ax.set_xlabel('labels (%)')
      ax.set_ylabel(headline.axis_label)
      ax.grid(True, alpha=0.3)
      ax.legend(fontsize=8)
  figure.suptitle('lines: mean over seeds; bands: min–max over seeds', fontsize=9)
  figure.tight_layout()
  if path is not None:
    path = os.fspath(path)
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.draw()
    # Copy out of the canvas buffer and drop the opaque alpha; write_png writes atomically.
    render.write_png(path, np.array(canvas.buffer_rgba())[..., :3])
  return figure


# --- Everything at once ----------------------------------------------------------------------


def write_report(rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike) -> dict[str, str]:
  """Writes results.csv, results.md and study.png into ``out_dir`` (created if needed).

  The CSV is written first, so the raw results survive if a later step fails.

  Returns:
    {'csv': path, 'markdown': path, 'plot': path}.
  """
  out_dir = os.fspath(out_dir)
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  paths = {name: os.path.join(out_dir, filename) for name, filename in
           (('csv', 'results.csv'), ('markdown', 'results.md'), ('plot', 'study.png'))}
  write_csv(rows, paths['csv'])
  summary = summarise(rows)
  table = markdown_table(summary, all_label_savings(summary))
  atomic.write_bytes(paths['markdown'], ('# Label-efficiency study\n\n' + table).encode('utf-8'))
  plot_study(summary, paths['plot'])
  return paths
