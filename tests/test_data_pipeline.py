"""Writer and reader: stock TFDS reads the shards, statistics are right, hosts split the data."""

import collections
import functools
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
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


def flaky_examples(index, fail_at, calls_dir):
  """Synthetic 16 px tiles; fails once at ``fail_at``; records each call as a file."""
  open(os.path.join(calls_dir, f'{index}-{len(os.listdir(calls_dir))}'), 'w').close()
  if index == fail_at:
    raise RuntimeError(f'source died at unit {index}')
  return build_synthetic.synthetic_examples(index, seed=0, tile_size=16)


def records(path):
  return [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(path))]


def test_interrupted_build_resumes_and_equals_a_clean_build(tmp_path):
  units = {'train': list(range(8)), 'test': list(range(8, 12))}
  contract = schema.InputContract(tile_size=16)
  calls = tmp_path / 'calls'
  calls.mkdir()
  output = tmp_path / 'ds'
  # Unit 5 is in train shard 1 (units 1, 5): shard 0 finishes, shard 1 dies.
  with pytest.raises(RuntimeError, match='source died at unit 5'):
    writer.build_dataset(str(output), units,
                         functools.partial(flaky_examples, fail_at=5, calls_dir=str(calls)),
                         contract, num_shards=4)
  names = os.listdir(output)
  assert 'dataset_info.json' not in names
  assert not [n for n in names if 'incomplete' in n]  # No half-written shard left.
  assert 's1_tiles-train.tfrecord-00000-of-00004' in names
  with pytest.raises(FileNotFoundError):
    data_input.HostDataset(str(output), 'train')  # Not readable until complete.
  first_calls = len(os.listdir(calls))
  resumed, report = writer.build_dataset(
      str(output), units, functools.partial(flaky_examples, fail_at=-1, calls_dir=str(calls)),
      contract, num_shards=4)
  # Shard 0 (units 0 and 4) was not rebuilt; the 10 other units were.
  assert len(os.listdir(calls)) - first_calls == 10
  assert report == {'train': {'examples': 8, 'units': 8, 'skipped': {}},
                    'test': {'examples': 4, 'units': 4, 'skipped': {}}}
  clean, _ = writer.build_dataset(
      str(tmp_path / 'clean'), units,
      functools.partial(flaky_examples, fail_at=-1, calls_dir=str(calls)), contract,
      num_shards=4, workers=2)
  assert resumed == clean
  for name in os.listdir(tmp_path / 'clean'):
    if 'tfrecord' in name:
      # Protobuf map order may differ between processes: compare parsed examples, not bytes.
      assert records(output / name) == records(tmp_path / 'clean' / name), name
  assert sorted(os.listdir(output)) == sorted(os.listdir(tmp_path / 'clean'))


def skipping_examples(index):
  if index % 3 == 0:
    return [writer.Skip('constant channel')]
  return build_synthetic.synthetic_examples(index, seed=0, tile_size=16)


def test_skipped_units_are_counted(tmp_path):
  _, report = writer.build_dataset(str(tmp_path / 'ds'), {'train': list(range(9))},
                                   skipping_examples, schema.InputContract(tile_size=16),
                                   num_shards=2)
  assert report['train'] == {'examples': 6, 'units': 9, 'skipped': {'constant channel': 3}}
  builder = tfds.builder_from_directory(str(tmp_path / 'ds'))
  assert builder.info.splits['train'].num_examples == 6
  assert builder.info.metadata['build_report']['train']['skipped'] == {'constant channel': 3}


def eleven_bands(index):
  example = build_synthetic.tile_example(synthetic.generate_tile(0, index, 16))
  example[schema.IMAGE] = example[schema.IMAGE][..., :11]
  return [example]


def test_wrong_band_count_is_refused_with_its_tile(tmp_path):
  with pytest.raises(ValueError, match=r'train unit 0 \(syn-0-0000000\): image shape'):
    writer.build_dataset(str(tmp_path / 'ds'), {'train': [0]}, eleven_bands,
                         schema.InputContract(tile_size=16), num_shards=1)
  assert not [n for n in os.listdir(tmp_path / 'ds') if 'tfrecord' in n]


def masked_seasons(index, present, products=schema.PRODUCTS):
  """Synthetic 16 px tiles with only the seasons in ``present`` (of ``products``; the other
  products keep all four): the rest NaN, as a partial-season archive gives them."""
  example = build_synthetic.tile_example(synthetic.generate_tile(0, index, 16))
  image = np.array(example[schema.IMAGE], np.float32)
  for product in products:
    for season in schema.SEASONS:
      if season not in present:
        image[..., schema.band_index(product, season)] = np.nan
  example[schema.IMAGE] = image
  return [example]


def test_empty_seasons_borrow_their_products_statistics(tmp_path):
  """Winter and summer present: spring and fall get the statistics of the winter and summer
  values of their product pooled (numpy over the stored float16 values)."""
  present = ('winter', 'summer')
  contract, report = writer.build_dataset(
      str(tmp_path / 'ds'), {'train': list(range(6)), 'test': [6, 7]},
      functools.partial(masked_seasons, present=present), schema.InputContract(tile_size=16),
      num_shards=2)
  images = np.stack([np.clip(masked_seasons(i, present)[0][schema.IMAGE], *schema.CLIP_RANGE_DB)
                     .astype(np.float16) for i in range(6)]).astype(np.float64)
  for product in schema.PRODUCTS:
    pooled = images[..., [schema.band_index(product, s) for s in present]]
    for season in schema.SEASONS:
      channel = schema.band_index(product, season)
      own = images[..., channel] if season in present else pooled
      assert contract.mean[channel] == pytest.approx(np.mean(own), rel=1e-9)
      assert contract.std[channel] == pytest.approx(np.std(own), rel=1e-6)
  borrowed = {f'{p}_{s}': [f'{p}_winter', f'{p}_summer'] for p in schema.PRODUCTS
              for s in ('spring', 'fall')}
  assert report['statistics_borrowed'] == borrowed
  info = tfds.builder_from_directory(str(tmp_path / 'ds')).info
  assert info.metadata['statistics_borrowed'] == borrowed
  assert writer.read_contract(str(tmp_path / 'ds')) == contract


def test_a_product_without_any_data_stops_the_build_and_leaves_no_shard(tmp_path):
  # VH missing in every season (and so VV-VH): nothing to borrow from.
  make = functools.partial(masked_seasons, present=(), products=('vh', 'vv_minus_vh'))
  with pytest.raises(ValueError, match=r'no valid training pixel in channels \[0, 1, 2, 3, 8, '
                                       r'9, 10, 11\] \(vv_minus_vh_winter.*vh_fall\) nor in any '
                                       r'other season.*shards of this build were deleted'):
    writer.build_dataset(str(tmp_path / 'ds'), {'train': list(range(4))}, make,
                         schema.InputContract(tile_size=16), num_shards=2)
  assert not os.path.exists(tmp_path / 'ds')  # The build made the folder, so it went too.
  # In a folder that existed before (empty), only the build's own files go.
  (tmp_path / 'mine').mkdir()
  with pytest.raises(ValueError, match='shards of this build were deleted'):
    writer.build_dataset(str(tmp_path / 'mine'), {'train': list(range(4))}, make,
                         schema.InputContract(tile_size=16), num_shards=2)
  assert os.listdir(tmp_path / 'mine') == []


def test_an_existing_dataset_is_not_overwritten_by_accident(tiny_dataset):
  with pytest.raises(FileExistsError, match=r'exists; pass --overwrite \(overwrite=True\)'):
    build_synthetic.build(tiny_dataset, tile_size=TILE_SIZE, train=64, validation=16, test=16,
                          num_shards=8)


def test_missing_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='cannot open a TFDS dataset'):
    data_input.HostDataset(str(tmp_path / 'nowhere'), 'train')


def test_inspect_reports_counts_ranges_and_renders_tiles(tiny_dataset, tmp_path):
  from data_pipeline.ingest import inspect  # pylint: disable=g-import-not-at-top
  text = inspect.inspect(tiny_dataset, sample=16, num_tiles=2, output=str(tmp_path))
  builder = tfds.builder_from_directory(tiny_dataset)
  regions = collections.Counter(
      schema.REGIONS[ex[schema.REGION]] for ex in tfds.as_numpy(builder.as_dataset('train')))
  assert '[train] 64 tiles (' + ', '.join(f'{r} {n}' for r, n in sorted(regions.items())) in text
  assert '[test] 16 tiles' in text and 'vh_fall' in text and 'tree_cover' in text
  sheet = np.asarray(Image.open(tmp_path / 'tiles_train.png'))
  assert sheet.shape == (2 * TILE_SIZE + 4, 2 * TILE_SIZE + 4, 3)
  assert (tmp_path / 'report.txt').read_text() == text
