"""Shared test setup: 8 fake CPU devices and a small embedded dataset built once per session."""

import os

# Must happen before jax is imported anywhere.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest  # pylint: disable=g-import-not-at-top

TILE_SIZE = 32


@pytest.fixture(scope='session')
def tiny_dataset(tmp_path_factory):
  """A 32 px synthetic dataset: 64 train, 16 validation, 16 test tiles in 8 shards."""
  from data_pipeline import build_synthetic  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp('data') / 'synthetic32')
  build_synthetic.build(path, tile_size=TILE_SIZE, train=64, validation=16, test=16,
                        num_shards=8, seed=0)
  return path


def make_tiny_config(data_dir):
  """The tiny preset shrunk to 32 px tiles and a few steps, on ``data_dir``."""
  import configs.pretrain as pretrain  # pylint: disable=g-import-not-at-top
  config = pretrain.get_config('tiny')
  config.dataset.data_dir = data_dir
  config.dataset.shuffle_buffer = 16
  config.model.image_size = TILE_SIZE
  config.model.encoder.update(dict(width=32, depth=2, heads=2, mlp_dim=64))
  config.model.decoder.update(dict(width=32, depth=1, heads=2, mlp_dim=64))
  config.batch_size = 8
  config.total_steps = 3
  config.log_every_steps = 1
  config.image_every_steps = 1000
  config.checkpoint.every_steps = 1000
  config.checkpoint.async_save = False
  return config


@pytest.fixture
def tiny_config(tiny_dataset):
  """:func:`make_tiny_config` on the session dataset."""
  return make_tiny_config(tiny_dataset)
