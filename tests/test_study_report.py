"""Tests for mae_jax.trainers.study_report: CSV, summary, label savings, Markdown table and plot."""

import math
import os
import re

import numpy as np
from PIL import Image
import pytest

from mae_jax.trainers import study_report
from mae_jax.trainers import study_stats

FRACTIONS = study_report.FRACTIONS  # 0.001 .. 1


def _summary(task, region, pretrained, scratch):
  """A summary with given mean curves (callables of the fraction), one seed each."""
  out = {}
  for init, curve in (('pretrained', pretrained), ('scratch', scratch)):
    for f in FRACTIONS:
      m = curve(f)
      out[(task, region, f, init)] = dict(metric='x', mean=m, std=float('nan'), min=m, max=m,
                                          n_seeds=1)
  return out


def rmse_scratch(f):
  return 20.0 - 3.0 * math.log10(f)  # lower is better, improves with more labels


def miou_scratch(f):
  return 0.7 + 0.1 * math.log10(f)  # higher is better


@pytest.mark.parametrize('task,scratch', [('vcf', rmse_scratch), ('worldcover', miou_scratch)])
def test_savings_of_a_summary_use_the_monotone_fits(task, scratch):
  # Pretrained at f equals scratch at 10 ** 0.5 f: it needs sqrt(10) times fewer labels.
  shift = 10**0.5
  summary = _summary(task, 'europe', lambda f: scratch(f * shift), scratch)
  savings = study_report.label_savings(summary, task, 'europe')
  assert list(savings) == list(FRACTIONS)
  assert savings[0.001] == study_stats.Saving('lower', 1.0)
  for f in (0.01, 0.1, 1.0):
    assert savings[f].bound == 'exact' and savings[f].factor == pytest.approx(shift, rel=1e-9)
  # The old first-crossing rule read 178x at 100 % here (8.5 first reached between 0.1 % and
  # 1 %); the monotone fit of the pretrained curve pools 8 and 9 and the crossing moves.
  pretrained = dict(zip(FRACTIONS, [10.0, 8.0, 9.0, 5.0]))
  scratch_curve = dict(zip(FRACTIONS, [12.0, 11.0, 10.5, 8.5]))
  savings = study_report.label_savings(
      _summary('vcf', 'europe', pretrained.get, scratch_curve.get), 'vcf', 'europe')
  expected = study_stats.monotone_savings(FRACTIONS, [10.0, 8.0, 9.0, 5.0],
                                          [12.0, 11.0, 10.5, 8.5], False)
  assert list(savings.values()) == expected
  with pytest.raises(ValueError, match='unknown task'):
    study_report.label_savings(summary, 'ndvi', 'europe')


def _rows(seeds=3):
  rng = np.random.default_rng(0)
  rows = []
  for task, base in (('vcf', 15.0), ('worldcover', 0.5)):
    for region in ('south_america', 'europe'):
      for f in FRACTIONS:
        for init in ('scratch', 'pretrained'):
          for seed in range(seeds):
            value = base * (1 + 0.1 * rng.standard_normal())
            row = {'task': task, 'region': region, 'fraction': f, 'init': init, 'seed': seed,
                   'lr': 1e-3, 'best_step': int(rng.integers(100, 1000))}
            row['rmse' if task == 'vcf' else 'miou'] = value
            if task == 'vcf':
              row['r2'] = 0.5
            else:
              row['overall_accuracy'] = 0.8
            rows.append(row)
  return rows


def test_csv_round_trip(tmp_path):
  rows = _rows()
  path = tmp_path / 'results.csv'
  study_report.write_csv(rows, path)
  header = path.read_text().splitlines()[0].split(',')
  assert header == ['task', 'region', 'fraction', 'init', 'seed', 'rmse', 'miou', 'best_step',
                    'lr', 'overall_accuracy', 'r2']
  back = study_report.read_csv(path)
  assert back == rows
  assert isinstance(back[0]['seed'], int) and isinstance(back[0]['fraction'], float)
  assert os.listdir(tmp_path) == ['results.csv']  # no temporary file left behind


def test_summary_matches_numpy():
  rows = _rows()
  summary = study_report.summarise(rows)
  assert len(summary) == 2 * 2 * len(FRACTIONS) * 2
  key = ('worldcover', 'south_america', 0.01, 'pretrained')
  values = np.array([r['miou'] for r in rows
                     if (r['task'], r['region'], r['fraction'], r['init']) == key])
  assert summary[key] == pytest.approx(dict(metric='miou', mean=values.mean(),
                                            std=values.std(ddof=1), min=values.min(),
                                            max=values.max(), n_seeds=3))
  with pytest.raises(ValueError, match='duplicate'):
    study_report.summarise(rows + rows[:1])
  with pytest.raises(ValueError, match='headline metric'):
    study_report.summarise([{'task': 'vcf', 'region': 'europe', 'fraction': 1.0,
                             'init': 'scratch', 'seed': 0, 'miou': 0.3}])


def test_markdown_table():
  summary = {}
  summary.update(_summary('vcf', 'europe', lambda f: rmse_scratch(10 * f), rmse_scratch))
  summary.update(_summary('worldcover', 'south_america', lambda f: miou_scratch(f / 10),
                          miou_scratch))
  # A second seed for one cell: mean ± std appears.
  summary[('vcf', 'europe', 0.1, 'scratch')].update(std=0.5, n_seeds=2)
  text = study_report.markdown_table(summary, study_report.all_label_savings(summary))
  lines = text.splitlines()
  assert '| Region | Labels (%) | Pretrained | Scratch | Difference | Label savings |' in lines
  # Pretrained at 0.1 % is scratch at 1 %: 20 - 3 * (-2) = 26; scratch 20 + 9 = 29.
  assert '| europe | 0.1 | 26.00 | 29.00 | -3.00 | >1x |' in lines
  assert '| europe | 1 | 23.00 | 26.00 | -3.00 | >10x |' in lines
  assert '| europe | 10 | 20.00 | 23.00 ± 0.50 | -3.00 | 10x |' in lines
  # Pretrained worse at every fraction: no savings anywhere (the old rule read 0.1x and n/r).
  assert '| south_america | 100 | 0.600 | 0.700 | -0.100 | none |' in lines
  assert '| south_america | 10 | 0.500 | 0.600 | -0.100 | none |' in lines
  assert 'RMSE (pp), lower is better' in text and 'mIoU, higher is better' in text
  assert 'seeds n = 1–2' in text and 'seeds n = 1.' in text


def test_markdown_table_with_intervals_and_calls():
  rng = np.random.default_rng(3)
  base = {f: rng.gamma(2.0, 40.0 / (1 + 10 * f), (3, 50)) for f in FRACTIONS}
  cells = {}
  rows = []
  for f in FRACTIONS:
    cells[(f, 'scratch')] = {'sq_error': base[f]}
    # Pretrained clearly better at 1 %, the same as scratch elsewhere.
    cells[(f, 'pretrained')] = {'sq_error': base[f] * (0.3 if f == 0.01 else 1.0)}
    for init in ('pretrained', 'scratch'):
      for seed, value in enumerate(np.sqrt(cells[(f, init)]['sq_error'].mean(-1))):
        rows.append({'task': 'vcf', 'region': 'europe', 'fraction': f, 'init': init,
                     'seed': seed, 'rmse': float(value)})
  panel = study_stats.bootstrap_panel('vcf', False, cells, replicates=200)
  summary = study_report.summarise(rows)
  text = study_report.markdown_table(summary, study_report.all_label_savings(summary),
                                     {('vcf', 'europe'): panel})
  assert ('| Region (test tiles) | Labels (%) | Pretrained | Scratch | Difference | '
          'Clear at 95 % | Label savings |') in text
  line = next(l for l in text.splitlines() if l.startswith('| europe (50) | 1 |'))
  diff = panel['differences'][0.01]
  assert f'{diff["mean"]:+.2f} [{diff["low"]:+.2f}, {diff["high"]:+.2f}]' in line
  assert '| yes: pretrained better |' in line
  same = next(l for l in text.splitlines() if l.startswith('| europe (50) | 100 |'))
  assert same.endswith('| no | 1x [1x, 1x] |')  # Equal models: a factor of 1, no savings.
  assert '200 replicates' in text


def test_write_report_puts_provenance_first(tmp_path):
  paths = study_report.write_report(_rows(seeds=2), tmp_path, provenance=['- Commit: `abc`'])
  assert open(paths['markdown']).read().startswith(
      '# Label-efficiency study\n\n- Commit: `abc`\n\n### VCF')


def test_format_factor():
  saving = study_stats.Saving
  assert study_report.format_factor(saving('exact', 12.34)) == '12.3x'
  assert study_report.format_factor(saving('exact', 177.8)) == '178x'
  assert study_report.format_factor(saving('lower', 10.0)) == '>10x'
  assert study_report.format_factor(saving('not reached')) == 'n/r'
  assert study_report.format_factor(saving('worse')) == 'none'
  assert study_report.format_factor(saving('undefined')) == 'n/a'
  assert study_report.format_factor(None) == 'n/a'


def test_plot_and_write_report(tmp_path):
  rows = _rows(seeds=2)
  summary = study_report.summarise(rows)
  path = tmp_path / 'sub' / 'study.png'
  figure = study_report.plot_study(summary, path)
  assert len(figure.axes) == 4  # (vcf, worldcover) x (europe, south_america)
  assert [ax.get_title() for ax in figure.axes] == [
      'VCF — europe', 'VCF — south_america', 'WorldCover — europe', 'WorldCover — south_america']
  assert figure.axes[0].get_xscale() == 'log'
  assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ['0.1', '1', '10', '100']
  assert figure.axes[0].get_ylabel() == 'RMSE (pp)' and figure.axes[2].get_ylabel() == 'mIoU'
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  with Image.open(path) as image:
    assert image.size[0] > 500 and image.size[1] > 500

  paths = study_report.write_report(rows, tmp_path / 'report')
  assert sorted(os.listdir(tmp_path / 'report')) == ['results.csv', 'results.md', 'study.png']
  assert study_report.read_csv(paths['csv']) == rows
  assert '| europe | 0.1 |' in open(paths['markdown']).read()
  with Image.open(paths['plot']) as image:
    image.verify()


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED_STUDIES = ('docs/study_quick/results.md', 'docs/study_probe/results.md')


@pytest.mark.parametrize('results', COMMITTED_STUDIES)
def test_readme_tables_are_the_committed_results(results):
  # The README's study tables are copies of committed results.md files (which name the commit,
  # command and seeds that produced them); regenerate both when a change moves the figures.
  path = os.path.join(REPO, results)
  text = open(path).read()
  assert re.search(r'^- Commit: `[0-9a-f]{12}`;', text, re.MULTILINE), 'results.md names no commit'
  readme = open(os.path.join(REPO, 'README.md')).read()
  command = study_report.SYNC_COMMAND.format(results=results, readme='README.md')
  assert study_report.readme_section(readme, results, 'README.md') == \
      study_report.readme_block(text), f'README.md differs from {results}: run `{command}`'


def test_sync_readme_rewrites_only_the_copy(tmp_path):
  results = tmp_path / 'results.md'
  results.write_text('# Label-efficiency study\n\n- Commit: `abc`\n\n### VCF: RMSE (pp)\n\n| a |\n')
  begin, end = study_report._markers(str(results), str(tmp_path / 'README.md'))
  readme = tmp_path / 'README.md'
  readme.write_text(f'intro\n{begin}\nold table\n{end}\noutro\n')
  assert study_report.sync_readme(str(results), str(readme))
  assert readme.read_text() == (f'intro\n{begin}\n- Commit: `abc`\n\n#### VCF: RMSE (pp)\n\n'
                                f'| a |\n{end}\noutro\n')
  assert not study_report.sync_readme(str(results), str(readme))  # Nothing left to change.
  readme.write_text('no markers\n')
  with pytest.raises(ValueError, match='markers'):
    study_report.sync_readme(str(results), str(readme))
