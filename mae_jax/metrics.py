"""Dataset-level downstream metrics: VCF regression and WorldCover segmentation.

Metrics are computed over a whole evaluation set, never as means of per-batch values (a mean of
batch RMSEs or batch mIoUs is biased whenever batches differ in size or content). The work is split
in two halves:

* Per-batch sufficient statistics (:func:`regression_sums`, :func:`confusion_matrix`): jax.numpy
  with fixed output shapes, meant to run inside ``jit`` on sharded global batches. Their outputs
  are small reductions, replicated on every device.
* Host-side finalisers (:func:`add_sums`, :func:`regression_metrics`,
  :func:`segmentation_metrics`): numpy float64 / int64, turning the accumulated sums into metrics.

A typical evaluation loop::

  total = None
  for batch in eval_batches:
    total = metrics.add_sums(total, jitted_eval_step(state, batch))  # regression_sums / cm dict
  vcf = metrics.regression_metrics(total['vcf'])
  worldcover = metrics.segmentation_metrics(total['confusion_matrix'])

Conventions: VCF values are percent tree cover (percentage points); a confusion matrix has rows =
true class and columns = predicted class; classes absent from both labels and predictions are
left out of the mIoU.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline import schema

REGRESSION_SUM_KEYS = ('count', 'sum_error', 'sum_abs_error', 'sum_sq_error', 'sum_target',
                       'sum_sq_target')

# --- Per-batch sufficient statistics (jittable) -----------------------------------------------


def regression_sums(pred: jax.Array, target: jax.Array, weight: jax.Array) -> dict[str, jax.Array]:
  """Per-batch sums from which RMSE, MAE, bias and R^2 of the whole set follow.

  Args:
    pred: (B,) predictions, in percentage points.
    target: (B,) targets, in percentage points; NaN where missing.
    weight: (B,) float or bool; 0 where the target is missing or the example is padding. Weights
      other than 0/1 give weighted metrics (``count`` is then the sum of weights).

  Returns:
    Dict of float32 scalars with keys ``REGRESSION_SUM_KEYS``. Examples with weight 0 contribute
    nothing even when their pred or target is NaN. A NaN with nonzero weight makes the sums NaN on
    purpose, so a forgotten mask fails loudly in :func:`regression_metrics` instead of silently
    shrinking the evaluation set.
  """
  pred = jnp.asarray(pred, jnp.float32)
  target = jnp.asarray(target, jnp.float32)
  weight = jnp.asarray(weight, jnp.float32)
  keep = weight != 0
  # NaN * 0 is NaN, so masked values are replaced before they are multiplied by their weight.
  error = jnp.where(keep, pred - target, 0.0)
  target = jnp.where(keep, target, 0.0)
  return {
      'count': jnp.sum(weight),
      'sum_error': jnp.sum(weight * error),
      'sum_abs_error': jnp.sum(weight * jnp.abs(error)),
      'sum_sq_error': jnp.sum(weight * error**2),
      'sum_target': jnp.sum(weight * target),
      'sum_sq_target': jnp.sum(weight * target**2),
  }


def confusion_matrix(labels: jax.Array,
                     logits_or_preds: jax.Array,
                     num_classes: int = schema.NUM_CLASSES,
                     ignore_index: int = schema.IGNORE_INDEX,
                     weight: jax.Array | None = None) -> jax.Array:
  """Per-batch confusion matrix of a segmentation, rows = true class, columns = predicted class.

  Args:
    labels: (B, H, W) integer class indices (uint8 allowed).
    logits_or_preds: (B, H, W) integer predicted class indices, or (B, H, W, num_classes) logits
      (reduced with argmax over the last axis).
    num_classes: Number of classes C.
    ignore_index: Label value of pixels to leave out (no-data).
    weight: Optional (B,) per-example weight; examples where it is 0/False (padding) are left out.

  Returns:
    (C, C) int32 counts. Pixels whose label is ``ignore_index`` or otherwise outside 0..C-1 are
    left out (an out-of-range label cannot raise inside jit). int32 holds 2**31 pixels, i.e. over
    10,000 tiles of 448 x 448 per batch; accumulate across batches on the host in int64
    (:func:`add_sums` does).
  """
  labels = jnp.asarray(labels).astype(jnp.int32)
  preds = jnp.asarray(logits_or_preds)
  if preds.ndim == labels.ndim + 1:
    preds = jnp.argmax(preds, axis=-1)
  preds = preds.astype(jnp.int32)
  if labels.shape != preds.shape:
    raise ValueError(f'labels {labels.shape} and predictions {preds.shape} differ in shape')
  valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
  valid &= (preds >= 0) & (preds < num_classes)
  if weight is not None:
    weight = jnp.asarray(weight)
    if weight.shape != labels.shape[:1]:
      raise ValueError(f'weight must be (B,) = {labels.shape[:1]}, got {weight.shape}')
    valid &= (weight != 0).reshape((-1,) + (1,) * (labels.ndim - 1))
  # Left-out pixels go to an extra bin that is dropped. Integer bincount rather than a one-hot
  # einsum: float32 matmul accumulation stops being exact above 2**24 counts per cell, which a
  # large batch of 448 px tiles reaches.
  flat = jnp.where(valid, labels * num_classes + preds, num_classes * num_classes)
  counts = jnp.bincount(flat.ravel(), length=num_classes * num_classes + 1)
  return counts[:-1].reshape(num_classes, num_classes).astype(jnp.int32)


# --- Host-side accumulation and finalisers ----------------------------------------------------


def _to_host(value: Any) -> np.ndarray:
  value = np.asarray(jax.device_get(value))
  # Integer counts (confusion matrices) stay exact in int64; everything else sums in float64.
  if np.issubdtype(value.dtype, np.integer) or value.dtype == bool:
    return value.astype(np.int64)
  return value.astype(np.float64)


def add_sums(total: Any, batch: Any) -> Any:
  """Adds one batch's statistics to a running total on the host.

  Args:
    total: The running total, or None before the first batch.
    batch: A (possibly nested) dict of scalars/arrays, or a single array, as returned by
      :func:`regression_sums` / :func:`confusion_matrix` (device or numpy arrays).

  Returns:
    The new total with the same structure: float64 numpy for float values, int64 for integers.
  """
  if isinstance(batch, Mapping):
    if total is not None and set(total) != set(batch):
      raise ValueError(f'add_sums: keys differ: total {sorted(total)}, batch {sorted(batch)}')
    return {key: add_sums(None if total is None else total[key], value)
            for key, value in batch.items()}
  value = _to_host(batch)
  return value if total is None else total + value


def regression_metrics(sums: Mapping[str, Any]) -> dict[str, float]:
  """RMSE, MAE, bias (mean of pred - target) and R^2 of the accumulated set.

  R^2 = 1 - SSE / SST with SST = sum_sq_target - sum_target**2 / count (the spread of the targets
  around their own mean over the whole set); it is NaN when all targets are equal.

  Raises:
    ValueError: If the count is 0 or the sums are not finite (a NaN with nonzero weight).
  """
  missing = [key for key in REGRESSION_SUM_KEYS if key not in sums]
  if missing:
    raise ValueError(f'regression sums lack {missing}')
  s = {key: float(np.asarray(sums[key], np.float64)) for key in REGRESSION_SUM_KEYS}
  if not all(np.isfinite(v) for v in s.values()):
    raise ValueError(f'regression sums are not finite ({s}): a NaN prediction or target had '
                     'nonzero weight; give missing targets and padding weight 0')
  count = s['count']
  if count <= 0:
    raise ValueError('regression_metrics: no examples with nonzero weight (count == 0)')
  sst = s['sum_sq_target'] - s['sum_target']**2 / count
  return {
      'rmse': float(np.sqrt(max(s['sum_sq_error'], 0.0) / count)),
      'mae': s['sum_abs_error'] / count,
      'bias': s['sum_error'] / count,
      'r2': float(1.0 - s['sum_sq_error'] / sst) if sst > 0 else float('nan'),
      'count': count,
  }


def _ratio_or_none(numerator: np.ndarray, denominator: np.ndarray) -> list[float | None]:
  return [float(n / d) if d > 0 else None for n, d in zip(numerator, denominator)]


def segmentation_metrics(cm: Any,
                         class_names: Sequence[str] = schema.WORLDCOVER_NAMES) -> dict[str, Any]:
  """Overall accuracy, mIoU and per-class IoU / accuracy of an accumulated confusion matrix.

  Args:
    cm: (C, C) counts, rows = true class, columns = predicted class.
    class_names: C names, used as keys of the per-class dicts.

  Returns:
    Dict with ``overall_accuracy`` (trace / total), ``miou`` (mean IoU over the classes present,
    i.e. with union = row sum + column sum - diagonal > 0; a class only predicted counts with IoU
    0), ``per_class_iou`` and ``per_class_accuracy`` (recall = diagonal / row sum) as
    name -> float, None for classes where the ratio is undefined (JSON-friendly), and
    ``num_pixels``.

  Raises:
    ValueError: On a non-square matrix, a wrong number of names, or an empty matrix.
  """
  cm = np.asarray(jax.device_get(cm)).astype(np.int64)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
    raise ValueError(f'confusion matrix must be square (C, C), got {cm.shape}')
  if len(class_names) != cm.shape[0]:
    raise ValueError(f'{len(class_names)} class names for a {cm.shape} confusion matrix')
  total = int(cm.sum())
  if total <= 0:
    raise ValueError('segmentation_metrics: empty confusion matrix (no labelled pixels)')
  diag = np.diag(cm)
  rows, cols = cm.sum(axis=1), cm.sum(axis=0)
  iou = _ratio_or_none(diag, rows + cols - diag)
  present = [v for v in iou if v is not None]
  return {
      'overall_accuracy': float(diag.sum() / total),
      'miou': float(np.mean(present)),
      'per_class_iou': dict(zip(class_names, iou)),
      'per_class_accuracy': dict(zip(class_names, _ratio_or_none(diag, rows))),
      'num_pixels': total,
  }
