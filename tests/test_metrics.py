"""Tests for mae_jax.metrics: dataset-level regression and segmentation metrics."""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from data_pipeline import schema
from mae_jax import metrics

BATCH = 16


def _padded_batches(pred, target, sizes):
  """Splits data into batches of the given sizes, each padded to BATCH with NaN, weight 0."""
  start = 0
  for size in sizes:
    p = np.full(BATCH, np.nan, np.float32)
    t = np.full(BATCH, np.nan, np.float32)
    p[:size] = pred[start:start + size]
    t[:size] = target[start:start + size]
    weight = np.zeros(BATCH, np.float32)
    weight[:size] = ~np.isnan(t[:size])
    start += size
    yield p, t, weight


def test_regression_over_uneven_batches_matches_numpy():
  rng = np.random.default_rng(0)
  n = 40
  target = rng.uniform(0, 100, n).astype(np.float32)
  target[rng.choice(n, 6, replace=False)] = np.nan  # missing VCF
  pred = (target + rng.normal(3, 8, n)).astype(np.float32)
  pred[np.isnan(pred)] = rng.uniform(0, 100, np.isnan(pred).sum())
  sums = jax.jit(metrics.regression_sums)
  total = None
  for p, t, w in _padded_batches(pred, target, [16, 5, 11, 1, 7]):
    total = metrics.add_sums(total, sums(p, t, w))
  assert total['count'].dtype == np.float64
  result = metrics.regression_metrics(total)

  valid = ~np.isnan(target)
  p, t = pred[valid].astype(np.float64), target[valid].astype(np.float64)
  error = p - t
  expected = {
      'rmse': np.sqrt(np.mean(error**2)),
      'mae': np.mean(np.abs(error)),
      'bias': np.mean(error),
      'r2': 1 - np.sum(error**2) / np.sum((t - t.mean())**2),
      'count': valid.sum(),
  }
  for key, value in expected.items():
    np.testing.assert_allclose(result[key], value, rtol=1e-6, err_msg=key)


def test_regression_hand_computed():
  sums = metrics.regression_sums(jnp.array([10., 20., 30.]), jnp.array([12., 18., 33.]),
                                 jnp.ones(3))
  result = metrics.regression_metrics(metrics.add_sums(None, sums))
  assert result['rmse'] == pytest.approx(np.sqrt((4 + 4 + 9) / 3))
  assert result['mae'] == pytest.approx(7 / 3)
  assert result['bias'] == pytest.approx(-1.0)  # (-2 + 2 - 3) / 3
  # Targets 12, 18, 33: mean 21, SST = 81 + 9 + 144 = 234, SSE = 17.
  assert result['r2'] == pytest.approx(1 - 17 / 234)
  assert result['count'] == 3


def test_dataset_rmse_is_not_mean_of_batch_rmses():
  # Batch 1: one example with error 10; batch 2: three examples with error 0.
  batches = [(np.array([10., 0, 0, 0]), np.array([0., 0, 0, 0]), np.array([1., 0, 0, 0])),
             (np.array([5., 5, 5, 0]), np.array([5., 5, 5, 0]), np.array([1., 1, 1, 0]))]
  total = None
  batch_rmses = []
  for p, t, w in batches:
    sums = metrics.add_sums(None, metrics.regression_sums(p, t, w))
    batch_rmses.append(metrics.regression_metrics(sums)['rmse'])
    total = metrics.add_sums(total, sums)
  assert np.mean(batch_rmses) == pytest.approx(5.0)
  assert metrics.regression_metrics(total)['rmse'] == pytest.approx(np.sqrt(100 / 4))


def test_regression_weighted_matches_numpy_average():
  rng = np.random.default_rng(1)
  pred, target = rng.normal(50, 10, 12), rng.normal(50, 10, 12)
  weight = rng.uniform(0, 2, 12)
  result = metrics.regression_metrics(
      metrics.add_sums(None, metrics.regression_sums(pred, target, weight)))
  np.testing.assert_allclose(result['rmse'],
                             np.sqrt(np.average((pred - target)**2, weights=weight)), rtol=1e-5)
  np.testing.assert_allclose(result['mae'], np.average(np.abs(pred - target), weights=weight),
                             rtol=1e-5)


def test_regression_errors():
  zero = metrics.add_sums(None, metrics.regression_sums(np.ones(3), np.full(3, np.nan),
                                                        np.zeros(3)))
  assert zero['count'] == 0 and np.isfinite(zero['sum_sq_error'])  # NaN under weight 0: no harm
  with pytest.raises(ValueError, match='count == 0'):
    metrics.regression_metrics(zero)
  # A NaN target that was not masked must not vanish silently.
  unmasked = metrics.add_sums(None, metrics.regression_sums(np.ones(2), np.array([1., np.nan]),
                                                            np.ones(2)))
  with pytest.raises(ValueError, match='nonzero weight'):
    metrics.regression_metrics(unmasked)


def _reference_cm(labels, preds, num_classes, ignore_index, weight):
  cm = np.zeros((num_classes, num_classes), np.int64)
  for b in range(labels.shape[0]):
    if not weight[b]:
      continue
    valid = labels[b] != ignore_index
    np.add.at(cm, (labels[b][valid].astype(int), preds[b][valid].astype(int)), 1)
  return cm


def _random_segmentation(seed, batch=BATCH, size=6, num_classes=schema.NUM_CLASSES):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, (batch, size, size)).astype(np.uint8)
  labels[rng.random(labels.shape) < 0.2] = schema.IGNORE_INDEX
  preds = rng.integers(0, num_classes, (batch, size, size)).astype(np.int32)
  weight = rng.random(batch) < 0.75
  return labels, preds, weight


def test_confusion_matrix_matches_reference():
  labels, preds, weight = _random_segmentation(0)
  cm = jax.jit(metrics.confusion_matrix, static_argnums=2)(labels, preds, schema.NUM_CLASSES,
                                                          weight=weight)
  assert cm.shape == (schema.NUM_CLASSES, schema.NUM_CLASSES) and cm.dtype == jnp.int32
  expected = _reference_cm(labels, preds, schema.NUM_CLASSES, schema.IGNORE_INDEX, weight)
  np.testing.assert_array_equal(cm, expected)
  # Logits give the same matrix as their argmax.
  logits = jax.nn.one_hot(preds, schema.NUM_CLASSES) * 3.0
  np.testing.assert_array_equal(metrics.confusion_matrix(labels, logits, weight=weight), expected)
  # Accumulated over batches on the host in int64.
  total = metrics.add_sums(metrics.add_sums(None, cm), cm)
  assert total.dtype == np.int64
  np.testing.assert_array_equal(total, 2 * expected)


def test_segmentation_absent_and_only_predicted_classes():
  # Four classes: 0 and 1 labelled; 2 nowhere (absent); 3 only predicted (IoU 0, counted).
  ignore = schema.IGNORE_INDEX
  pairs = [(0, 0)] * 3 + [(0, 1), (0, 3)] + [(1, 1)] * 2 + [(ignore, 2), (ignore, 0)]
  labels = np.array([[[l for l, _ in pairs]]], np.uint8)
  preds = np.array([[[p for _, p in pairs]]], np.int32)
  cm = metrics.confusion_matrix(labels, preds, num_classes=4)
  np.testing.assert_array_equal(cm, [[3, 1, 0, 1], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
  result = metrics.segmentation_metrics(cm, class_names=('a', 'b', 'c', 'd'))
  # IoU a = 3 / (5 + 3 - 3), b = 2 / (2 + 3 - 2), d = 0 / (0 + 1 - 0); c has no union.
  assert result['per_class_iou'] == pytest.approx({'a': 3 / 5, 'b': 2 / 3, 'c': None, 'd': 0.0})
  assert result['miou'] == pytest.approx((3 / 5 + 2 / 3 + 0) / 3)
  assert result['overall_accuracy'] == pytest.approx(5 / 7)  # ignored pixels are left out
  assert result['num_pixels'] == 7
  assert result['per_class_accuracy'] == pytest.approx({'a': 3 / 5, 'b': 1.0, 'c': None,
                                                        'd': None})


def test_segmentation_hand_computed_three_classes():
  labels = np.array([[[0, 0, 1, 1, 2, 2]]], np.uint8)
  preds = np.array([[[0, 1, 1, 1, 2, 0]]], np.int32)
  cm = metrics.confusion_matrix(labels, preds, num_classes=3)
  np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 2, 0], [1, 0, 1]])
  result = metrics.segmentation_metrics(cm, class_names=('x', 'y', 'z'))
  # IoU x = 1 / (2 + 2 - 1), y = 2 / (2 + 3 - 2), z = 1 / (2 + 1 - 1).
  assert result['miou'] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
  assert result['overall_accuracy'] == pytest.approx(4 / 6)
  assert result['per_class_accuracy'] == pytest.approx({'x': 0.5, 'y': 1.0, 'z': 0.5})


def test_segmentation_errors_and_default_names():
  with pytest.raises(ValueError, match='empty'):
    metrics.segmentation_metrics(np.zeros((schema.NUM_CLASSES,) * 2, np.int64))
  with pytest.raises(ValueError, match='class names'):
    metrics.segmentation_metrics(np.eye(3, dtype=np.int64))
  result = metrics.segmentation_metrics(np.eye(schema.NUM_CLASSES, dtype=np.int64))
  assert list(result['per_class_iou']) == list(schema.WORLDCOVER_NAMES)
  assert result['miou'] == 1.0


def test_sharded_batch_matches_unsharded():
  assert jax.device_count() == 8
  mesh = Mesh(np.array(jax.devices()), ('data',))
  sharding = NamedSharding(mesh, P('data'))
  labels, preds, weight = _random_segmentation(3)
  rng = np.random.default_rng(4)
  pred = rng.uniform(0, 100, BATCH).astype(np.float32)
  target = rng.uniform(0, 100, BATCH).astype(np.float32)
  target[::5] = np.nan

  def step(labels, preds, weight, pred, target):
    reg_weight = weight & ~jnp.isnan(target)
    return {'vcf': metrics.regression_sums(pred, target, reg_weight),
            'cm': metrics.confusion_matrix(labels, preds, weight=weight)}

  args = (labels, preds, weight, pred, target)
  sharded_args = [jax.device_put(a, sharding) for a in args]
  assert len(sharded_args[0].sharding.device_set) == 8
  sharded = metrics.add_sums(None, jax.jit(step)(*sharded_args))
  plain = metrics.add_sums(None, step(*args))
  np.testing.assert_array_equal(sharded['cm'], plain['cm'])
  # float32 sums in a different order: equal up to rounding of summands of size ~100 ** 2.
  for key in metrics.REGRESSION_SUM_KEYS:
    np.testing.assert_allclose(sharded['vcf'][key], plain['vcf'][key], rtol=1e-6, atol=1e-3)
  assert sharded['vcf']['count'] == np.sum(weight & ~np.isnan(target))
  np.testing.assert_array_equal(
      sharded['cm'], _reference_cm(labels, preds, schema.NUM_CLASSES, schema.IGNORE_INDEX, weight))
