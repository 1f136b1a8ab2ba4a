"""Writer and reader: stock TFDS reads the shards, statistics are right, hosts split the data."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipeline import build_synthetic
from data_pipeline import input as data_input
from data_pipeline import schema
from data_pipeline import synthetic
from data_pipeline import writer
from tests.conftest import TILE_SIZE


def test_stock_tfds_reads_what_was_written(tiny_dataset):
  builder = tfds.builder_from_directory(tiny_dataset)
  assert {name: split.num_examples for name, split in builder.info.splits.items()} == {
      'train': 64, 'validation': 16, 'test': 16}
  assert builder.info.splits['train'].num_shards == 8
  examples = {ex[schema.TILE_ID].decode(): ex for ex in tfds.as_numpy(builder.as_dataset('test'))}
  # The test split holds tile indices 80..95 of seed 0.
  tile = synthetic.generate_tile(0, 85, TILE_SIZE)
  stored = examples[tile.tile_id]
  expected = np.clip(tile.image, *schema.CLIP_RANGE_DB).astype(np.float16)
  np.testing.assert_array_equal(stored[schema.IMAGE], expected)  # NaN == NaN here.
  np.testing.assert_array_equal(stored[schema.WORLDCOVER], tile.worldcover)
  assert stored[schema.VCF] == pytest.approx(tile.vcf, rel=1e-6)
  assert schema.REGIONS[stored[schema.REGION]] == tile.region


def test_statistics_equal_numpy_over_training_tiles(tiny_dataset):
  contract = writer.read_contract(tiny_dataset)
  images = np.stack([np.clip(t.image, *schema.CLIP_RANGE_DB).astype(np.float16)
                     for t in synthetic.generate_tiles(0, 64, TILE_SIZE)]).astype(np.float64)
  np.testing.assert_allclose(contract.mean, np.nanmean(images, axis=(0, 1, 2)), rtol=1e-9)
  np.testing.assert_allclose(contract.std, np.nanstd(images, axis=(0, 1, 2)), rtol=1e-6)
  assert contract.band_names == schema.BAND_NAMES and contract.tile_size == TILE_SIZE


def _ids(dataset, **kwargs):
  ids = []
  for batch in dataset.batches(4, features=(schema.TILE_ID,), **kwargs):
    ids.extend(batch[schema.TILE_ID].tolist())
  return ids


def test_hosts_read_disjoint_even_shares(tiny_dataset):
  shares = [data_input.HostDataset(tiny_dataset, 'train', process_index=i, process_count=2)
            for i in range(2)]
  assert [s.num_examples for s in shares] == [32, 32]
  epoch = [set(_ids(s, seed=0, num_steps=8, shuffle_buffer=1)) for s in shares]
  assert len(epoch[0] | epoch[1]) == 64 and not epoch[0] & epoch[1]


def test_stream_is_deterministic_and_resumes_mid_epoch(tiny_dataset):
  dataset = data_input.HostDataset(tiny_dataset, 'train')
  full = list(dataset.batches(8, seed=3, num_steps=20, shuffle_buffer=16))
  again = list(dataset.batches(8, seed=3, num_steps=20, shuffle_buffer=16))
  resumed = list(dataset.batches(8, seed=3, start_step=11, num_steps=9, shuffle_buffer=16))
  for a, b in zip(full, again):
    np.testing.assert_array_equal(a[schema.IMAGE], b[schema.IMAGE])
  for a, b in zip(full[11:], resumed):
    np.testing.assert_array_equal(a[schema.IMAGE], b[schema.IMAGE])
  # Epochs (8 batches of 8) come in different orders, and batch 0 differs from batch 8.
  assert not np.array_equal(full[0][schema.IMAGE], full[8][schema.IMAGE])
  assert full[0][schema.IMAGE].dtype == np.float16


def test_shard_count_must_be_a_multiple_of_hosts(tiny_dataset):
  with pytest.raises(ValueError, match='8 files, not a multiple of the 3 processes'):
    data_input.HostDataset(tiny_dataset, 'train', process_index=0, process_count=3)


def test_failed_write_leaves_nothing_behind(tmp_path):
  def broken():
    for tile in synthetic.generate_tiles(0, 3, 16):
      yield build_synthetic.tile_example(tile)
    raise RuntimeError('source died')
  output = tmp_path / 'ds'
  with pytest.raises(RuntimeError, match='source died'):
    writer.write_dataset(str(output), {'train': broken()}, schema.InputContract(tile_size=16),
                         num_shards=2)
  assert os.listdir(tmp_path) == []


def test_wrong_band_count_is_refused_with_its_tile(tmp_path):
  example = build_synthetic.tile_example(synthetic.generate_tile(0, 0, 16))
  example[schema.IMAGE] = example[schema.IMAGE][..., :11]
  with pytest.raises(ValueError, match=r'train example 0 \(syn-0-0000000\): image shape'):
    writer.write_dataset(str(tmp_path / 'ds'), {'train': [example]},
                         schema.InputContract(tile_size=16), num_shards=1)
  assert os.listdir(tmp_path) == []


def test_missing_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='cannot open a TFDS dataset'):
    data_input.HostDataset(str(tmp_path / 'nowhere'), 'train')
