"""Label subsets and record selections (data_pipeline.subsets), and the split index they use."""

import random

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipeline import input as data_input
from data_pipeline import schema
from data_pipeline import subsets


def fake_ids(n):
  return [f'tile-{i:05d}' for i in range(n)]


@pytest.mark.parametrize('seed', [0, 1])
def test_subsets_are_nested_with_the_expected_sizes(seed):
  ids = fake_ids(1000)
  chosen = [set(subsets.label_subset(ids, f, seed).tolist()) for f in subsets.LABEL_FRACTIONS]
  assert subsets.LABEL_FRACTIONS == (0.001, 0.01, 0.1, 1.0)
  assert [len(c) for c in chosen] == [1, 10, 100, 1000]
  for smaller, larger in zip(chosen, chosen[1:]):
    assert smaller < larger
  assert chosen[-1] == set(range(1000))
  # The recipe: a prefix of a seeded permutation of the sorted ids (here already sorted).
  permutation = np.random.default_rng(seed).permutation(1000)
  assert chosen[1] == set(permutation[:10].tolist())


def test_subsets_are_stable_and_do_not_depend_on_the_order_of_the_ids():
  ids = fake_ids(1000)
  shuffled = list(ids)
  random.Random(3).shuffle(shuffled)
  for fraction in subsets.LABEL_FRACTIONS:
    first = subsets.label_subset(ids, fraction, seed=7)
    assert first.dtype == np.int64 and np.all(np.diff(first) > 0)  # Sorted indices.
    np.testing.assert_array_equal(first, subsets.label_subset(ids, fraction, seed=7))
    other = subsets.label_subset(shuffled, fraction, seed=7)
    assert {ids[i] for i in first} == {shuffled[i] for i in other}
  assert (set(subsets.label_subset(ids, 0.1, seed=0).tolist()) !=
          set(subsets.label_subset(ids, 0.1, seed=1).tolist()))


def test_tiny_fractions_of_tiny_sets_keep_one_tile_and_rounding_is_half_up():
  for n in (1, 2, 7, 30):
    for fraction in (0.001, 0.01):
      assert len(subsets.label_subset(fake_ids(n), fraction, seed=0)) == 1
  assert subsets.subset_size(10, 0.25) == 3  # 2.5 rounds up (round() would give 2).
  assert subsets.subset_size(4, 0.375) == 2  # 1.5 rounds up.
  assert subsets.subset_size(1000, 0.1) == 100 and subsets.subset_size(7, 1.0) == 7
  assert len(subsets.label_subset([b'a', b'b'], 1.0, seed=0)) == 2  # Bytes ids are decoded.


def test_bad_label_subsets_are_refused():
  for fraction in (0.0, -0.1, 1.5, float('nan')):
    with pytest.raises(ValueError, match='label fraction must lie in'):
      subsets.label_subset(fake_ids(10), fraction, seed=0)
  with pytest.raises(ValueError, match='no tile ids'):
    subsets.label_subset([], 0.5, seed=0)
  with pytest.raises(ValueError, match="tile id 'tile-00003' appears more than once"):
    subsets.label_subset(fake_ids(5) + ['tile-00003'], 0.5, seed=0)


def fake_index(n=200):
  """Regions cycling through schema.REGIONS; every third tile without a VCF label."""
  vcf = np.arange(n, dtype=np.float32)
  vcf[::3] = np.nan
  return {schema.TILE_ID: np.asarray(fake_ids(n), object),
          schema.REGION: np.arange(n) % len(schema.REGIONS), schema.VCF: vcf}


def test_select_records_filters_regions_then_labels_then_draws_the_fraction():
  index = fake_index()
  names = [schema.REGIONS[r] for r in index[schema.REGION]]
  in_regions = [i for i, name in enumerate(names) if name in schema.PRETRAIN_REGIONS]
  np.testing.assert_array_equal(
      subsets.select_records(index, regions=schema.PRETRAIN_REGIONS), in_regions)
  usable = [i for i in in_regions if not np.isnan(index[schema.VCF][i])]
  np.testing.assert_array_equal(
      subsets.select_records(index, regions=schema.PRETRAIN_REGIONS, labelled='vcf'), usable)
  np.testing.assert_array_equal(subsets.select_records(index), np.arange(200))
  np.testing.assert_array_equal(subsets.select_records(index, labelled='worldcover'),
                                np.arange(200))
  # The fraction is drawn among the usable records, nested across fractions for one seed.
  selections = [set(subsets.select_records(index, regions=schema.PRETRAIN_REGIONS,
                                           labelled='vcf', fraction=f, seed=4).tolist())
                for f in subsets.LABEL_FRACTIONS]
  assert [len(s) for s in selections] == [subsets.subset_size(len(usable), f)
                                          for f in subsets.LABEL_FRACTIONS]
  for smaller, larger in zip(selections, selections[1:]):
    assert smaller <= larger
  assert selections[-1] == set(usable)
  drawn = subsets.label_subset([index[schema.TILE_ID][i] for i in usable], 0.1, seed=4)
  assert selections[2] == {usable[i] for i in drawn}


def test_bad_selections_are_refused():
  index = fake_index()
  with pytest.raises(ValueError, match=r"unknown regions \['atlantis'\]"):
    subsets.select_records(index, regions=('europe', 'atlantis'))
  with pytest.raises(ValueError, match='labelled must be one of'):
    subsets.select_records(index, labelled='lidar')
  index[schema.VCF][:] = np.nan
  with pytest.raises(ValueError, match=r"no records in regions \['china'\] with a VCF label"):
    subsets.select_records(index, regions=('china',), labelled='vcf')


@pytest.mark.parametrize('split', ['train', 'validation'])
def test_split_index_equals_a_stock_tfds_read_in_file_order(tiny_dataset, split):
  builder = tfds.builder_from_directory(tiny_dataset)
  stock = list(tfds.as_numpy(builder.as_dataset(split, shuffle_files=False)))
  index = data_input.read_split_index(tiny_dataset, split)
  assert sorted(index) == sorted([schema.TILE_ID, schema.REGION, schema.VCF])
  assert list(index[schema.TILE_ID]) == [ex[schema.TILE_ID].decode() for ex in stock]
  assert all(type(t) is str for t in index[schema.TILE_ID])  # pylint: disable=unidiomatic-typecheck
  np.testing.assert_array_equal(index[schema.REGION], [ex[schema.REGION] for ex in stock])
  np.testing.assert_array_equal(index[schema.VCF], [ex[schema.VCF] for ex in stock])
  lat = data_input.read_split_index(tiny_dataset, split, features=(schema.LAT,))
  np.testing.assert_array_equal(lat[schema.LAT], [ex[schema.LAT] for ex in stock])


def test_region_selection_on_the_dataset_picks_those_regions(tiny_dataset):
  builder = tfds.builder_from_directory(tiny_dataset)
  stock = list(tfds.as_numpy(builder.as_dataset('train', shuffle_files=False)))
  index = data_input.read_split_index(tiny_dataset, 'train')
  selected = subsets.select_records(index, regions=schema.PRETRAIN_REGIONS)
  expected = [i for i, ex in enumerate(stock)
              if schema.REGIONS[ex[schema.REGION]] in schema.PRETRAIN_REGIONS]
  assert 0 < len(expected) < 64
  np.testing.assert_array_equal(selected, expected)
