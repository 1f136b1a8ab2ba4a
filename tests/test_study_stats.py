"""Tests for mae_jax.trainers.study_stats: monotone fits, savings, tile metrics, the bootstrap."""

import itertools
import math

import numpy as np
import pytest

from mae_jax import metrics
from mae_jax.trainers import study_stats

FRACTIONS = (0.001, 0.01, 0.1, 1.0)


def test_isotonic_pools_violators_and_is_the_least_squares_monotone_fit():
  assert study_stats.isotonic([1.0, 3.0, 2.0, 4.0]).tolist() == [1.0, 2.5, 2.5, 4.0]
  assert study_stats.isotonic([5.0, 1.0, 3.0]).tolist() == pytest.approx([3.0, 3.0, 3.0])
  assert study_stats.isotonic([4.0, 2.0, 3.0, 1.0], increasing=False).tolist() == pytest.approx(
      [4.0, 2.5, 2.5, 1.0])
  # Against brute force: the best of a fine grid of non-decreasing sequences.
  rng = np.random.default_rng(0)
  grid = np.linspace(0, 1, 21)
  for _ in range(5):
    y = rng.uniform(0, 1, 3)
    best = min((c for c in itertools.combinations_with_replacement(grid, 3)),
               key=lambda c: np.sum((np.asarray(c) - y)**2))
    fit = study_stats.isotonic(y)
    assert np.all(np.diff(fit) >= 0)
    assert np.sum((fit - y)**2) <= np.sum((np.asarray(best) - y)**2) + 1e-12


def test_a_worse_pretrained_model_never_shows_savings():
  # The README's old WorldCover South America row: the pretrained curve dips at 100 % (0.250
  # after 0.268) and the first-crossing interpolation read 10.6x although the pretrained model
  # is worse at 100 %.
  pretrained = [0.061, 0.144, 0.268, 0.250]
  scratch = [0.067, 0.136, 0.269, 0.265]
  savings = study_stats.monotone_savings(FRACTIONS, pretrained, scratch, higher_is_better=True)
  assert [s.bound for s in savings] == ['worse', 'exact', 'worse', 'worse']
  assert savings[3].value == 0.0 and savings[3].factor is None
  # At 1 %: the scratch fit (0.136) is reached by the pretrained fit between 0.1 % (0.061) and
  # 1 % (0.144): t = (0.136 - 0.061) / (0.144 - 0.061), f* = 10 ** (-3 + t).
  t = (0.136 - 0.061) / (0.144 - 0.061)
  assert savings[1].factor == pytest.approx(0.01 / 10**(-3 + t))


def test_savings_on_log_linear_curves_and_bounds():
  def scratch_rmse(f):
    return 20.0 - 3.0 * math.log10(f)  # lower is better
  shift = 10**0.5  # Pretrained at f = scratch at sqrt(10) f: sqrt(10) times fewer labels.
  savings = study_stats.monotone_savings(FRACTIONS, [scratch_rmse(f * shift) for f in FRACTIONS],
                                         [scratch_rmse(f) for f in FRACTIONS], False)
  assert savings[0] == study_stats.Saving('lower', 1.0)
  for saving in savings[1:]:
    assert saving.bound == 'exact' and saving.factor == pytest.approx(shift)
  # Ten times more labels needed: 'exact' below 1 inside the grid, not reached at the top.
  worse = study_stats.monotone_savings(FRACTIONS, [scratch_rmse(f / 10) for f in FRACTIONS],
                                       [scratch_rmse(f) for f in FRACTIONS], False)
  assert [s.bound for s in worse] == ['worse'] * 4  # worse at every fraction: never savings
  # A fit that pools a dip: the pretrained mean at 10 % is better than scratch's, but the
  # crossing is sought on the pooled (monotone) curve.
  pooled = study_stats.monotone_savings(FRACTIONS, [0.2, 0.5, 0.45, 0.6], [0.1, 0.3, 0.4, 0.5],
                                        True)
  # Fit [0.2, 0.475, 0.475, 0.6]; scratch 0.4 at 10 % is reached between 0.1 % and 1 %.
  assert pooled[2].bound == 'exact'
  assert pooled[2].factor == pytest.approx(0.1 / 10**(-3 + 0.2 / 0.275))
  assert study_stats.monotone_savings(FRACTIONS, [0.2, math.nan, 0.4, 0.5], [0.1] * 4,
                                      True)[0].bound == 'undefined'
  with pytest.raises(ValueError, match='ascending'):
    study_stats.monotone_savings((1.0, 0.1), [1, 2], [1, 2], True)


def test_tile_metric_matches_metrics_on_the_resampled_tiles():
  rng = np.random.default_rng(1)
  num_tiles, classes = 7, 11
  sq_error = rng.uniform(0, 100, (2, num_tiles))
  sq_error[1, 3] = np.nan  # An unlabelled tile.
  confusion = rng.integers(0, 50, (2, num_tiles, classes, classes))
  confusion[:, :, 4, :] = 0  # A class nobody has,
  confusion[:, :, :, 4] = 0  # nor predicts: left out of the mIoU.
  counts = np.array([[1] * num_tiles, [3, 0, 0, 1, 2, 0, 1]])
  rmse = study_stats.tile_metric('vcf', {'sq_error': sq_error}, counts)
  miou = study_stats.tile_metric('worldcover', {'confusion': confusion}, counts)
  assert rmse.shape == miou.shape == (2, 2)
  for b in range(2):
    tiles = np.repeat(np.arange(num_tiles), counts[b])  # The resampled set, tile by tile.
    for s in range(2):
      errors = sq_error[s, tiles]
      assert rmse[b, s] == pytest.approx(np.sqrt(np.nanmean(errors)))
      summed = confusion[s, tiles].sum(0)
      assert miou[b, s] == pytest.approx(metrics.segmentation_metrics(summed)['miou'])
  with pytest.raises(ValueError, match='unknown task'):
    study_stats.tile_metric('ndvi', {}, counts)


def _cells(pre_offset, seeds=4, tiles=60, seed=0):
  """VCF cells: per-tile squared errors, the pretrained model's shifted by pre_offset."""
  rng = np.random.default_rng(seed)
  base = {f: rng.gamma(2.0, 40.0 / (1 + 10 * f), (seeds, tiles)) for f in FRACTIONS}
  cells = {}
  for f in FRACTIONS:
    cells[(f, 'scratch')] = {'sq_error': base[f]}
    cells[(f, 'pretrained')] = {'sq_error': np.maximum(base[f] + pre_offset, 0.0)}
  return cells


def test_bootstrap_panel_points_intervals_and_calls():
  same = study_stats.bootstrap_panel('vcf', False, _cells(0.0), replicates=300)
  for f in FRACTIONS:
    diff = same['differences'][f]
    assert diff['low'] == diff['high'] == 0.0 and not diff['clear'] and diff['better'] is None
    cell = same['cells'][(f, 'scratch')]
    per_seed = np.sqrt(_cells(0.0)[(f, 'scratch')]['sq_error'].mean(-1))
    assert cell['per_seed'] == pytest.approx(per_seed.tolist())
    assert cell['mean'] == pytest.approx(per_seed.mean())
    assert cell['low'] < cell['mean'] < cell['high']
  assert same['num_tiles'] == 60 and same['num_seeds'] == 4 and same['replicates'] == 300
  # Pretrained errors lower on every tile by a wide margin: a clear call, for pretrained.
  better = study_stats.bootstrap_panel('vcf', False, _cells(-15.0), replicates=300)
  for f in FRACTIONS:
    diff = better['differences'][f]
    assert diff['clear'] and diff['better'] == 'pretrained' and diff['high'] < 0
    assert all(d < 0 for d in diff['per_seed'])
  # Reproducible in its seed, different with another one.
  again = study_stats.bootstrap_panel('vcf', False, _cells(-15.0), replicates=300)
  assert again['cells'] == better['cells']
  other = study_stats.bootstrap_panel('vcf', False, _cells(-15.0), replicates=300, seed=1)
  assert other['cells'][(0.1, 'scratch')]['low'] != better['cells'][(0.1, 'scratch')]['low']
  with pytest.raises(ValueError, match='differ'):
    cells = _cells(0.0)
    cells[(1.0, 'scratch')] = {'sq_error': np.ones((3, 60))}
    study_stats.bootstrap_panel('vcf', False, cells, replicates=10)


def test_bootstrap_interval_covers_the_truth_about_as_often_as_it_says():
  # Many test sets drawn from one population of tiles: the 95 % interval of a cell's RMSE
  # should contain the population RMSE in roughly 95 % of them (seeds are identical here, so
  # only the tile level varies).
  population = np.random.default_rng(7).gamma(2.0, 30.0, 200_000)
  truth = math.sqrt(population.mean())
  hits, trials = 0, 60
  for trial in range(trials):
    sample = np.random.default_rng(100 + trial).choice(population, 80)
    stats = {'sq_error': np.stack([sample] * 2)}
    panel = study_stats.bootstrap_panel('vcf', False, {(1.0, 'scratch'): stats,
                                                       (1.0, 'pretrained'): stats},
                                        replicates=400, seed=trial)
    cell = panel['cells'][(1.0, 'scratch')]
    hits += cell['low'] <= truth <= cell['high']
  assert 0.85 * trials <= hits <= trials


def test_tile_stats_file_round_trip(tmp_path):
  path = str(tmp_path / study_stats.TILE_STATS_FILE)
  stats = {'region': np.array([0, 1, 1], np.int32),
           'confusion': np.arange(3 * 121, dtype=np.int32).reshape(3, 11, 11)}
  study_stats.save_tile_stats(path, 'worldcover', stats)
  back = study_stats.load_tile_stats(path)
  assert str(back['task']) == 'worldcover'
  np.testing.assert_array_equal(back['region'], stats['region'])
  np.testing.assert_array_equal(back['confusion'], stats['confusion'])
  assert sorted(p.name for p in tmp_path.iterdir()) == [study_stats.TILE_STATS_FILE]
