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
from mae_jax.trainers import study_stats


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
                  region: str) -> dict[float, study_stats.Saving]:
  """Label savings of one (task, region) from the mean curves, on monotone fits
  (:func:`mae_jax.trainers.study_stats.monotone_savings`): fraction -> Saving."""
  if task not in HEADLINE:
    raise ValueError(f'unknown task {task!r} (known: {sorted(HEADLINE)})')
  scratch_f, scratch_m = _curve(summary, task, region, 'scratch')
  pre_f, pre_m = _curve(summary, task, region, 'pretrained')
  if not scratch_f.size or not np.array_equal(scratch_f, pre_f):
    raise ValueError(f'label_savings needs pretrained and scratch results at the same '
                     f'fractions for {task}/{region}')
  return dict(zip(scratch_f.tolist(), study_stats.monotone_savings(
      scratch_f, pre_m, scratch_m, HEADLINE[task].higher_is_better)))


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


def _format_number(value: float) -> str:
  return f'{value:.0f}' if value >= 100 else f'{value:.3g}'


def format_factor(saving: study_stats.Saving | None) -> str:
  """'12.3x' (exact), '>10x' (lower bound), 'n/r' (not reached), 'none' (the pretrained mean
  is worse), 'n/a' (undefined or missing)."""
  if saving is None or saving.bound == 'undefined':
    return 'n/a'
  if saving.bound in ('not reached', 'worse'):
    return {'not reached': 'n/r', 'worse': 'none'}[saving.bound]
  return ('>' if saving.bound == 'lower' else '') + _format_number(saving.factor) + 'x'


def _format_factor_value(value: float) -> str:
  """An interval end of a factor (study_stats.Saving.value): 0 means no savings."""
  return 'none' if value == 0 else _format_number(value) + 'x'


def _format_percent(fraction: float) -> str:
  return f'{100 * fraction:g}'


def _format_stat(stat: Mapping[str, Any] | None, digits: int) -> str:
  if stat is None:
    return '–'
  text = f'{stat["mean"]:.{digits}f}'
  if math.isfinite(stat['std']):
    text += f' ± {stat["std"]:.{digits}f}'
  return text


def _format_interval(cell: Mapping[str, Any], digits: int, sign: str = '') -> str:
  return (f'{cell["mean"]:{sign}.{digits}f} [{cell["low"]:{sign}.{digits}f}, '
          f'{cell["high"]:{sign}.{digits}f}]')


PANEL_NOTE = (
    'Cells: mean over seeds on the whole test set [95 % interval]. Intervals come from a '
    'two-level bootstrap ({replicates} replicates) that resamples test tiles and seeds '
    '(mae_jax/trainers/study_stats.py); the difference pretrained − scratch is paired (same '
    'seeds, same resampled tiles) and is *clear* when its interval excludes 0. Label savings '
    '= f / f*, where f* is the fraction at which the monotone fit of the pretrained curve '
    '(linear in log10 fraction) reaches the monotone fit of the scratch curve at f; '
    "'>Nx' = reached at the smallest fraction already (a lower bound), 'n/r' = not reached "
    "within the grid, 'none' = the pretrained mean at f is worse than scratch's; an interval "
    "end 'none' means no savings in that share of the replicates.")


def markdown_table(summary: Mapping[SummaryKey, Any],
                   savings: Mapping[tuple[str, str], Mapping[float, Any]],
                   panels: Mapping[tuple[str, str], Mapping[str, Any]] | None = None) -> str:
  """One Markdown table per task: rows (region, labels %), pretrained vs scratch, savings.

  Args:
    summary: From :func:`summarise`.
    savings: (task, region) -> :func:`label_savings` output, e.g. from :func:`all_label_savings`
      (used where ``panels`` lacks the panel).
    panels: (task, region) -> :func:`mae_jax.trainers.study_stats.bootstrap_panel` output; with
      it every cell, difference and saving carries its 95 % interval and each difference is
      called (clear or not). Without it: mean ± std over seeds.
  """
  tasks, regions = _panels(summary)
  panels = panels or {}
  parts = []
  for task in tasks:
    headline = HEADLINE[task]
    digits = headline.digits
    seeds = sorted({s['n_seeds'] for k, s in summary.items() if k[0] == task})
    n_seeds = str(seeds[0]) if len(seeds) == 1 else f'{seeds[0]}–{seeds[-1]}'
    direction = 'higher' if headline.higher_is_better else 'lower'
    with_intervals = any((task, region) in panels for region in regions)
    parts += [f'### {headline.title}: {headline.axis_label}', '',
              f'{headline.axis_label}, {direction} is better; seeds n = {n_seeds}.', '']
    if with_intervals:
      replicates = {p.get('replicates') for k, p in panels.items() if k[0] == task}
      parts += [PANEL_NOTE.format(replicates='/'.join(str(r) for r in sorted(replicates))), '',
                '| Region (test tiles) | Labels (%) | Pretrained | Scratch | Difference | '
                'Clear at 95 % | Label savings |',
                '|---|---:|---:|---:|---:|---|---:|']
    else:
      parts += ['Mean ± sample std (ddof=1) over seeds. Difference = pretrained − scratch. '
                'Label savings on monotone fits of the mean curves (see study_stats.py).', '',
                '| Region | Labels (%) | Pretrained | Scratch | Difference | Label savings |',
                '|---|---:|---:|---:|---:|---:|']
    for region in regions:
      fractions = sorted({k[2] for k in summary if k[0] == task and k[1] == region})
      panel = panels.get((task, region))
      for fraction in fractions:
        pre = summary.get((task, region, fraction, 'pretrained'))
        scr = summary.get((task, region, fraction, 'scratch'))
        if panel is not None and fraction in panel['differences']:
          diff = panel['differences'][fraction]
          saving = panel['savings'][fraction]
          call = f'yes: {diff["better"]} better' if diff['clear'] else 'no'
          parts.append(
              f'| {region} ({panel["num_tiles"]}) | {_format_percent(fraction)} | '
              f'{_format_interval(panel["cells"][(fraction, "pretrained")], digits)} | '
              f'{_format_interval(panel["cells"][(fraction, "scratch")], digits)} | '
              f'{_format_interval(diff, digits, "+")} | {call} | '
              f'{format_factor(saving["saving"])} [{_format_factor_value(saving["low"])}, '
              f'{_format_factor_value(saving["high"])}] |')
          continue
        diff_text = (f'{pre["mean"] - scr["mean"]:+.{digits}f}'
                     if pre is not None and scr is not None else '–')
        saving = savings.get((task, region), {}).get(fraction)
        parts.append(f'| {region} | {_format_percent(fraction)} | {_format_stat(pre, digits)} | '
                     f'{_format_stat(scr, digits)} | {diff_text} | {format_factor(saving)} |')
    parts.append('')
  return '\n'.join(parts)


# --- Plot ------------------------------------------------------------------------------------

_STYLE = {'pretrained': dict(color='tab:blue', marker='o'),
          'scratch': dict(color='tab:orange', marker='s')}


def plot_study(summary: Mapping[SummaryKey, Any], path: str | os.PathLike | None = None, *,
               panels: Mapping[tuple[str, str], Mapping[str, Any]] | None = None,
               panel_inches: tuple[float, float] = (4.0, 3.0),
               dpi: int = 150) -> matplotlib.figure.Figure:
  """Plots headline metric vs label percentage: one panel per (task, region).

  Rows are tasks, columns regions; each panel has the pretrained and scratch mean curves with
  markers and a band: the 95 % bootstrap interval where ``panels`` has the panel, else the
  min–max over seeds; on a log x axis.

  Args:
    summary: From :func:`summarise`.
    panels: (task, region) -> :func:`mae_jax.trainers.study_stats.bootstrap_panel` output.
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
        cells = (panels or {}).get((task, region), {}).get('cells', {})
        if all((f, init) in cells for f, _ in stats):
          low = [cells[(f, init)]['low'] for f, _ in stats]
          high = [cells[(f, init)]['high'] for f, _ in stats]
        else:
          low, high = [s['min'] for _, s in stats], [s['max'] for _, s in stats]
        ax.fill_between(percent, low, high, color=_STYLE[init]['color'], alpha=0.2,
                        linewidth=0)
      ax.set_xscale('log')
      ticks = sorted({100 * k[2] for k in keys})
      ax.set_xticks(ticks, [f'{t:g}' for t in ticks])
      ax.minorticks_off()
      ax.set_xlabel('labels (%)')
      ax.set_ylabel(headline.axis_label)
      ax.grid(True, alpha=0.3)
      ax.legend(fontsize=8)
  figure.suptitle('lines: mean over seeds; bands: ' + (
      '95 % bootstrap interval (test tiles and seeds)' if panels else 'min–max over seeds'),
      fontsize=9)
  figure.tight_layout()
  if path is not None:
    path = os.fspath(path)
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.draw()
    # Copy out of the canvas buffer and drop the opaque alpha; write_png writes atomically.
    render.write_png(path, np.array(canvas.buffer_rgba())[..., :3])
  return figure


# --- Everything at once ----------------------------------------------------------------------


def write_report(rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike,
                 panels: Mapping[tuple[str, str], Mapping[str, Any]] | None = None,
                 provenance: Sequence[str] = ()) -> dict[str, str]:
  """Writes results.csv, results.md and study.png into ``out_dir`` (created if needed).

  The CSV is written first, so the raw results survive if a later step fails.

  Args:
    rows: One per (task, region, fraction, init, seed).
    out_dir: The folder.
    panels: (task, region) -> :func:`mae_jax.trainers.study_stats.bootstrap_panel` output, for
      intervals in the table and the plot.
    provenance: Lines for the head of results.md (commit, command, seeds, config).

  Returns:
    {'csv': path, 'markdown': path, 'plot': path}.
  """
  out_dir = os.fspath(out_dir)
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  paths = {name: os.path.join(out_dir, filename) for name, filename in
           (('csv', 'results.csv'), ('markdown', 'results.md'), ('plot', 'study.png'))}
  write_csv(rows, paths['csv'])
  summary = summarise(rows)
  table = markdown_table(summary, all_label_savings(summary), panels)
  head = '# Label-efficiency study\n\n' + ''.join(f'{line}\n' for line in provenance)
  atomic.write_bytes(paths['markdown'], (head + ('\n' if provenance else '') + table).encode(
      'utf-8'))
  plot_study(summary, paths['plot'], panels=panels)
  return paths


# --- The README's copy of a committed results.md ---------------------------------------------

README_BEGIN = '<!-- BEGIN copy of {results}: regenerate with `{command}` -->'
README_END = '<!-- END copy of {results} -->'
SYNC_COMMAND = 'python -m mae_jax.trainers.study_report --results {results} --readme {readme}'


def readme_block(results_text: str) -> str:
  """What the README shows of a results.md: everything under its title, headings one level
  down (the README nests them in its own section)."""
  lines = results_text.splitlines()
  if not lines or not lines[0].startswith('# '):
    raise ValueError('not a study results.md: it must start with its "# " title')
  body = '\n'.join(lines[1:]).strip('\n')
  return re.sub(r'^(#{2,5}) ', r'#\1 ', body, flags=re.MULTILINE)


def _markers(results: str, readme: str) -> tuple[str, str]:
  command = SYNC_COMMAND.format(results=results, readme=readme)
  return (README_BEGIN.format(results=results, command=command), README_END.format(results=results))


def readme_section(readme_text: str, results: str, readme: str) -> str:
  """The README's current copy between the markers of ``results`` (ValueError if absent)."""
  begin, end = _markers(results, readme)
  if readme_text.count(begin) != 1 or readme_text.count(end) != 1:
    raise ValueError(f'{readme} needs exactly one pair of markers for {results}:\n{begin}\n{end}')
  return readme_text.split(begin, 1)[1].split(end, 1)[0].strip('\n')


def sync_readme(results: str, readme: str) -> bool:
  """Rewrites the README's copy of ``results`` (paths relative to the repository root, as the
  markers name them); returns whether anything changed."""
  text = epath.Path(readme).read_text()
  current = readme_section(text, results, readme)
  wanted = readme_block(epath.Path(results).read_text())
  if current == wanted:
    return False
  begin, end = _markers(results, readme)
  head, rest = text.split(begin, 1)
  tail = rest.split(end, 1)[1]
  atomic.write_bytes(readme, f'{head}{begin}\n{wanted}\n{end}{tail}'.encode('utf-8'))
  return True


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m mae_jax.trainers.study_report --results R --readme README.md``: copies R's
  tables into the README between its markers (after a study moved the figures)."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument('--results', required=True, help='A committed results.md.')
  parser.add_argument('--readme', default='README.md')
  args = parser.parse_args(argv)
  changed = sync_readme(args.results, args.readme)
  print(f'{args.readme}: ' + ('updated from ' if changed else 'already matches ') + args.results)
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
