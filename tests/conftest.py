"""Shared test setup: 8 fake CPU devices, a small embedded dataset made once per test process."""

import os

# Must happen before jax is imported anywhere.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest  # pylint: disable=g-import-not-at-top

from tiny_config import TILE_SIZE  # pylint: disable=g-import-not-at-top,unused-import
from tiny_config import make_tiny_config  # pylint: disable=g-import-not-at-top,unused-import


@pytest.fixture(scope='session')
def tiny_dataset(tmp_path_factory):
  """A 32 px synthetic dataset: 64 train, 16 validation, 16 test tiles in 8 shards."""
  from data_pipeline import build_synthetic  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp('data') / 'synthetic32')
  build_synthetic.build(path, tile_size=TILE_SIZE, train=64, validation=16, test=16,
                        num_shards=8, seed=0)
  return path


@pytest.fixture
def tiny_config(tiny_dataset):
  """:func:`make_tiny_config` on the session dataset."""
  return make_tiny_config(tiny_dataset)


@pytest.fixture(scope='session')
def pretrained(tiny_dataset, tmp_path_factory):
  """(workdir, config) of a 3-step pretraining of :func:`make_tiny_config` on the session
  dataset; tests only read it (fine-tuning, embeddings)."""
  from mae_jax.trainers import pretrain  # pylint: disable=g-import-not-at-top
  config = make_tiny_config(tiny_dataset)
  workdir = str(tmp_path_factory.mktemp('pretrain'))
  pretrain.train_and_evaluate(config, workdir)
  return workdir, config
