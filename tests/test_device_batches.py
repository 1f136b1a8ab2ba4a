"""DevicePrefetch: the same batches as reading step by step, errors at their step, clean stops."""

import threading

import jax
import numpy as np
import pytest

from configs import pretrain as pretrain_configs
from data_pipeline import device_batches
from mae_jax import sharding


def host_batches(record=None):
  """step -> a distinct (8, 2) batch; ``record`` collects the steps read, in order."""
  def read(step):
    if record is not None:
      record.append(step)
    return {'image': np.full((8, 2), step, np.float16), 'id': np.arange(8) + 100 * step}
  return read


@pytest.mark.parametrize('depth', [0, 1, 3])
def test_prefetched_batches_are_the_synchronous_ones(depth):
  mesh = sharding.create_mesh(pretrain_configs.base_config().mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  record = []
  with device_batches.DevicePrefetch(host_batches(record), batch_sharding, start_step=5,
                                     stop_step=12, depth=depth) as prefetch:
    for step in range(5, 12):
      batch = prefetch.next(step)
      assert batch['image'].sharding == batch_sharding
      np.testing.assert_array_equal(batch['image'], np.full((8, 2), step))
      np.testing.assert_array_equal(batch['id'], np.arange(8) + 100 * step)
  assert record == list(range(5, 12))


def test_an_error_is_raised_at_its_own_step_after_the_good_batches():
  def read(step):
    if step == 3:
      raise OSError('shard-00002 is truncated')
    return {'image': np.zeros((8, 1), np.float16)}
  mesh = sharding.create_mesh(pretrain_configs.base_config().mesh)
  with device_batches.DevicePrefetch(read, sharding.batch_sharding(mesh), start_step=0,
                                     stop_step=10, depth=2) as prefetch:
    for step in range(3):
      prefetch.next(step)
    with pytest.raises(OSError, match='truncated'):
      prefetch.next(3)


def test_close_stops_a_reader_that_is_ahead_and_blocked():
  mesh = sharding.create_mesh(pretrain_configs.base_config().mesh)
  record = []
  prefetch = device_batches.DevicePrefetch(host_batches(record), sharding.batch_sharding(mesh),
                                           start_step=0, stop_step=1000, depth=2)
  prefetch.next(0)
  prefetch.close()
  assert not any(t.name == 'device_prefetch' and t.is_alive() for t in threading.enumerate())
  # At most the taken batch, two queued and one waiting to be queued were read.
  assert record == list(range(len(record))) and len(record) <= 4
  with pytest.raises(ValueError, match='depth must be >= 0'):
    device_batches.DevicePrefetch(host_batches(), sharding.batch_sharding(mesh), start_step=0,
                                  stop_step=1, depth=-1)
  assert jax.device_count() == 8
