"""Tests for data_pipeline.ingest.ee_export: Earth Engine TFRecord patch exports read back and placed.

Every test writes its own small export the way Earth Engine lays one out: one
tf.train.Example per patch with one float feature per band (row-major H * W values), shards
``<prefix>-NNNNN.tfrecord[.gz]`` and a ``<prefix>-mixer.json``.
"""

import json
import os

import affine
import numpy as np
import pytest
import tensorflow as tf

from data_pipeline.ingest import ee_export

# Patches 4 wide and 3 high, so a swapped width / height shows; 10 m north-up UTM pixels.
WIDTH, HEIGHT = 4, 3
MATRIX = [10.0, 0.0, 500000.0, 0.0, -10.0, 4800000.0]
CRS = 'EPSG:32633'
BANDS = ('VV', 'VH')


def patch_values(count, bands=BANDS, height=HEIGHT, width=WIDTH):
  """(count, height, width, bands) float32 where every value says its patch, band and pixel.

  Value = 1 + 1000 * patch + 100 * band + pixel: any mix-up of patches, bands or pixels changes
  it, and no value is 0 (the default no-data sentinel).
  """
  patch = np.arange(count)[:, None, None, None]
  band = np.arange(len(bands))[None, None, None, :]
  pixel = np.arange(height * width).reshape(1, height, width, 1)
  return (1 + 1000 * patch + 100 * band + pixel).astype(np.float32)


def serialize(features):
  """One Earth Engine style record: {name: (h, w) array} -> serialised tf.train.Example."""
  feature = {name: tf.train.Feature(float_list=tf.train.FloatList(
      value=np.asarray(values, np.float32).ravel().tolist())) for name, values in features.items()}
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_records(path, records, compression='GZIP'):
  with tf.io.TFRecordWriter(str(path), options=compression) as writer:
    for record in records:
      writer.write(record)
  return str(path)


def write_mixer(prefix, patches_per_row=3, total_patches=7, matrix=MATRIX, dims=(WIDTH, HEIGHT),
                crs=CRS):
  mixer = {'projection': {'crs': crs, 'affine': {'doubleMatrix': list(matrix)}},
           'patchDimensions': list(dims), 'patchesPerRow': patches_per_row,
           'totalPatches': total_patches}
  with open(f'{prefix}-mixer.json', 'w') as f:
    json.dump(mixer, f)
  return f'{prefix}-mixer.json'


def write_export(tmp_path, values, name='export', bands=BANDS, compression='GZIP',
                 shard_sizes=None, patches_per_row=3, total_patches=None, mixer=True,
                 matrix=MATRIX, dims=(WIDTH, HEIGHT)):
  """Writes patches (n, h, w, bands) as an export and returns its prefix."""
  prefix = str(tmp_path / name)
  records = [serialize({band: patch[..., b] for b, band in enumerate(bands)}) for patch in values]
  shard_sizes = shard_sizes or [len(records)]
  assert sum(shard_sizes) == len(records)
  suffix = '.tfrecord.gz' if compression == 'GZIP' else '.tfrecord'
  start = 0
  for shard, size in enumerate(shard_sizes):
    write_records(f'{prefix}-{shard:05d}{suffix}', records[start:start + size], compression)
    start += size
  if mixer:
    write_mixer(prefix, patches_per_row,
                len(records) if total_patches is None else total_patches, matrix, dims)
  return prefix


def read_all(prefix, band_names=BANDS, **kwargs):
  return list(ee_export.read_patches(prefix, band_names, **kwargs))


def expected_transform(row, col, margin=0, matrix=MATRIX):
  """The patch's first-pixel transform, written out by hand (also valid for rotated grids)."""
  a, b, c, d, e, f = matrix
  x = col * WIDTH - margin
  y = row * HEIGHT - margin
  return affine.Affine(a, b, c + a * x + b * y, d, e, f + d * x + e * y)


# --- Mixer and shards ------------------------------------------------------------------------


def test_read_mixer(tmp_path):
  path = write_mixer(str(tmp_path / 'x'), patches_per_row=3, total_patches=7)
  mixer = ee_export.read_mixer(path)
  assert mixer == ee_export.Mixer(crs=CRS, transform=affine.Affine(*MATRIX), patch_width=4,
                                  patch_height=3, patches_per_row=3, total_patches=7)
  assert mixer.num_rows == 3
  assert mixer.position(5) == (1, 2)
  # Patch 5, row 1 col 2: origin c + 2 * w * a, f + 1 * h * e.
  assert mixer.patch_transform(5) == affine.Affine(10, 0, 500000 + 2 * 4 * 10,
                                                   0, -10, 4800000 + 1 * 3 * -10)
  assert mixer.patch_transform(5, margin=1) == affine.Affine(10, 0, 500070, 0, -10, 4799980)
  with pytest.raises(IndexError):
    mixer.position(7)


def test_read_mixer_wkt(tmp_path):
  path = str(tmp_path / 'x-mixer.json')
  with open(path, 'w') as f:
    json.dump({'projection': {'wkt': 'PROJCS["custom"]', 'affine': {'doubleMatrix': MATRIX}},
               'patchDimensions': [4, 3], 'patchesPerRow': 1, 'totalPatches': 1}, f)
  assert ee_export.read_mixer(path).crs == 'PROJCS["custom"]'


@pytest.mark.parametrize('edit, message', [
    (lambda m: m.pop('patchesPerRow'), "missing key 'patchesPerRow'"),
    (lambda m: m['projection'].pop('affine'), "missing key 'projection.affine'"),
    (lambda m: m['projection']['affine'].pop('doubleMatrix'),
     "missing key 'projection.affine.doubleMatrix'"),
    (lambda m: m['projection'].pop('crs'), "missing key 'projection.crs'"),
    (lambda m: m['projection']['affine'].update(doubleMatrix=[1, 0, 0, 0, -1]), '6 finite'),
    (lambda m: m.update(patchDimensions=[4]), 'patchDimensions'),
    (lambda m: m.update(patchDimensions=[4, 0]), 'patchDimensions'),
    (lambda m: m.update(totalPatches='7'), "'totalPatches' must be a JSON integer"),
    (lambda m: m.update(patchesPerRow=0), 'patchesPerRow must be >= 1'),
])
def test_read_mixer_errors(tmp_path, edit, message):
  path = write_mixer(str(tmp_path / 'x'))
  with open(path) as f:
    mixer = json.load(f)
  edit(mixer)
  with open(path, 'w') as f:
    json.dump(mixer, f)
  with pytest.raises(ee_export.ExportError, match=message) as info:
    ee_export.read_mixer(path)
  assert path in str(info.value)


def test_read_mixer_bad_json(tmp_path):
  path = str(tmp_path / 'x-mixer.json')
  with open(path, 'w') as f:
    f.write('{"projection": ')
  with pytest.raises(ee_export.ExportError, match='not valid JSON') as info:
    ee_export.read_mixer(path)
  assert path in str(info.value)


def test_find_export_files(tmp_path):
  prefix = str(tmp_path / 'ex[1]')  # glob characters in the prefix must not matter
  for shard in (10, 2, 0, 1, 3, 4, 5, 6, 7, 8, 9):  # 10 sorts before 2 by name
    write_records(f'{prefix}-{shard:05d}.tfrecord.gz', [])
  write_records(str(tmp_path / 'ex[1]-b-00000.tfrecord.gz'), [])  # another export's shard
  write_records(str(tmp_path / 'other-00000.tfrecord'), [], '')
  files = ee_export.find_export_files(prefix)
  assert [os.path.basename(f) for f in files] == [f'ex[1]-{i:05d}.tfrecord.gz' for i in range(11)]

  with pytest.raises(FileNotFoundError, match='no export shards'):
    ee_export.find_export_files(str(tmp_path / 'nothing'))
  write_records(f'{prefix}-00002.tfrecord', [], '')
  with pytest.raises(ee_export.ExportError, match='shard 2 exists twice'):
    ee_export.find_export_files(prefix)


def test_find_export_files_gap(tmp_path):
  prefix = str(tmp_path / 'ex')
  for shard in (0, 2):
    write_records(f'{prefix}-{shard:05d}.tfrecord.gz', [])
  with pytest.raises(ee_export.ExportError, match=r'shard\(s\) \[1\] missing'):
    ee_export.find_export_files(prefix)


# --- Reading patches -------------------------------------------------------------------------


def test_values_and_band_order(tmp_path):
  values = patch_values(7)
  prefix = write_export(tmp_path, values)
  patches = read_all(prefix)
  assert [p.index for p in patches] == list(range(7))
  for patch, expected in zip(patches, values):
    assert patch.data.dtype == np.float32
    assert patch.data.shape == (HEIGHT, WIDTH, 2)
    np.testing.assert_array_equal(patch.data, expected)
    assert patch.band_names == BANDS
    assert patch.crs == CRS

  renamed = read_all(prefix, {'VV': 'vv', 'VH': 'vh'})
  assert renamed[3].band_names == ('vv', 'vh')
  np.testing.assert_array_equal(renamed[3].data, values[3])

  # The mapping's order is the output order; one band alone works too.
  swapped = read_all(prefix, {'VH': 'vh', 'VV': 'vv'})
  assert swapped[4].band_names == ('vh', 'vv')
  np.testing.assert_array_equal(swapped[4].data, values[4][..., ::-1])
  only_vh = read_all(prefix, ['VH'])
  np.testing.assert_array_equal(only_vh[6].data, values[6][..., 1:])


def test_positions_and_transforms(tmp_path):
  prefix = write_export(tmp_path, patch_values(7), patches_per_row=3)
  patches = read_all(prefix)
  assert [(p.row, p.col) for p in patches] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2),
                                               (2, 0)]
  # Patch 5: row 1, col 2; origin x = c + 2 * w * a, y = f + 1 * h * e.
  assert patches[5].transform == affine.Affine(10.0, 0.0, 500000.0 + 2 * 4 * 10.0,
                                               0.0, -10.0, 4800000.0 + 1 * 3 * -10.0)
  for patch in patches:
    assert patch.transform == expected_transform(patch.row, patch.col)


def test_rotated_grid_transform(tmp_path):
  matrix = [8.0, 6.0, 1000.0, 6.0, -8.0, 2000.0]
  prefix = write_export(tmp_path, patch_values(4), patches_per_row=2, matrix=matrix)
  patch = read_all(prefix)[3]  # row 1, col 1: pixel (x, y) = (4, 3)
  assert (patch.row, patch.col) == (1, 1)
  assert patch.transform == affine.Affine(8, 6, 1000 + 8 * 4 + 6 * 3, 6, -8, 2000 + 6 * 4 - 8 * 3)
  assert patch.transform == expected_transform(1, 1, matrix=matrix)


def test_gzip_and_plain_identical(tmp_path):
  values = patch_values(7)
  gz = write_export(tmp_path, values, name='gz', shard_sizes=[3, 3, 1])
  plain = write_export(tmp_path, values, name='plain', compression='', shard_sizes=[2, 5])
  assert ee_export.find_export_files(gz)[-1].endswith('-00002.tfrecord.gz')
  assert ee_export.find_export_files(plain)[-1].endswith('-00001.tfrecord')
  explicit = read_all(gz, compression='GZIP')
  for a, b, c in zip(read_all(gz), read_all(plain, compression=''), explicit, strict=True):
    assert (a.index, a.row, a.col, a.transform) == (b.index, b.row, b.col, b.transform)
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(a.data, c.data)


def test_kernel_margin(tmp_path):
  # kernel_size 3: records are (3 + 2) x (4 + 2), the patch proper is [1:-1, 1:-1].
  full = patch_values(7, height=HEIGHT + 2, width=WIDTH + 2)
  prefix = write_export(tmp_path, full)
  patches = read_all(prefix, kernel_size=3)
  for patch in patches:
    assert patch.data.shape == (HEIGHT, WIDTH, 2)
    np.testing.assert_array_equal(patch.data, full[patch.index, 1:-1, 1:-1])
    assert patch.transform == expected_transform(patch.row, patch.col)

  kept = read_all(prefix, kernel_size=3, keep_margin=True)
  np.testing.assert_array_equal(kept[5].data, full[5])
  # The margin's first pixel is one pixel left of and above the patch: x - a, y - e.
  assert kept[5].transform == affine.Affine(10, 0, 500080 - 10, 0, -10, 4799970 + 10)
  assert kept[5].transform == expected_transform(1, 2, margin=1)
  # data[1, 1] of the kept patch is data[0, 0] of the stripped one, at the same place.
  assert kept[5].transform @ (1, 1) == patches[5].transform @ (0, 0)

  # An even kernel_size k also gives k // 2 pixels per side: 2 for k = 4.
  full = patch_values(2, height=HEIGHT + 4, width=WIDTH + 4)
  prefix = write_export(tmp_path, full, name='k4', patches_per_row=2)
  np.testing.assert_array_equal(read_all(prefix, kernel_size=4)[1].data, full[1, 2:-2, 2:-2])


def test_nodata(tmp_path):
  values = patch_values(3)
  values[1, 0, 2, 1] = -9999.0
  values[2, 1, 1, 0] = 0.0
  prefix = write_export(tmp_path, values)

  patches = read_all(prefix, nodata=-9999.0)
  assert np.isnan(patches[1].data[0, 2, 1])
  assert np.isnan(patches[1].data).sum() == 1
  assert patches[2].data[1, 1, 0] == 0.0  # 0 is a legal dB value when it is not the sentinel
  assert not np.isnan(patches[0].data).any()

  default = read_all(prefix)  # Earth Engine's default fill, 0
  assert np.isnan(default[2].data[1, 1, 0]) and np.isnan(default[2].data).sum() == 1
  assert default[1].data[0, 2, 1] == -9999.0

  raw = read_all(prefix, nodata=None)
  np.testing.assert_array_equal(raw[1].data, values[1])
  np.testing.assert_array_equal(raw[2].data, values[2])


def test_nodata_compared_in_float32(tmp_path):
  values = patch_values(1)
  values[0, 0, 0, 0] = -99.9  # stored as float32(-99.9), which differs from the float64 -99.9
  prefix = write_export(tmp_path, values)
  patch = read_all(prefix, nodata=-99.9)[0]
  assert np.isnan(patch.data[0, 0, 0]) and np.isnan(patch.data).sum() == 1


def test_argument_errors(tmp_path):
  prefix = write_export(tmp_path, patch_values(1))
  with pytest.raises(ValueError, match='not the string'):
    ee_export.read_patches(prefix, 'VV')
  with pytest.raises(ValueError, match='empty'):
    ee_export.read_patches(prefix, [])
  with pytest.raises(ValueError, match='repeats output'):
    ee_export.read_patches(prefix, {'VV': 'x', 'VH': 'x'})
  with pytest.raises(ValueError, match='kernel_size'):
    ee_export.read_patches(prefix, BANDS, kernel_size=0)
  with pytest.raises(ValueError, match='compression'):
    ee_export.read_patches(prefix, BANDS, compression='ZLIB')


# --- Damaged exports -------------------------------------------------------------------------


def test_missing_mixer(tmp_path):
  prefix = write_export(tmp_path, patch_values(2), mixer=False)
  # Raised by the call itself, before any record is read.
  with pytest.raises(FileNotFoundError, match='maskedThreshold') as info:
    ee_export.read_patches(prefix, BANDS)
  assert f'{prefix}-mixer.json' in str(info.value)
  assert 'cannot be placed' in str(info.value)


def test_truncated_gzip(tmp_path):
  prefix = write_export(tmp_path, patch_values(6, height=20, width=20), patches_per_row=2,
                        dims=(20, 20))
  path = ee_export.find_export_files(prefix)[0]
  with open(path, 'rb') as f:
    data = f.read()

  # Cut in the middle of the data: TensorFlow reports a truncated record.
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])
  iterator = ee_export.read_patches(prefix, BANDS)
  with pytest.raises(ee_export.ExportError, match='truncated, corrupt') as info:
    for _ in iterator:
      pass
  assert path in str(info.value)
  assert 'record ' in str(info.value)

  # Cut so early (or in the gzip trailer) that TensorFlow sees a short but valid stream: the
  # trailer check must catch it, else the next shard's patches would be misplaced.
  for cut in (25, len(data) - 4):
    with open(path, 'wb') as f:
      f.write(data[:cut])
    with pytest.raises(ee_export.ExportError, match='truncated or corrupt') as info:
      read_all(prefix)
    assert path in str(info.value)


def test_truncated_gzip_record_index(tmp_path):
  # Records far larger than gzip's buffer, of random (incompressible) values, so a cut in
  # record 2 leaves records 0 and 1 readable.
  rng = np.random.default_rng(0)
  values = rng.normal(size=(4, 64, 64, 2)).astype(np.float32)
  prefix = write_export(tmp_path, values, patches_per_row=2, dims=(64, 64))
  path = ee_export.find_export_files(prefix)[0]
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:int(len(data) * 0.6)])
  read = []
  with pytest.raises(ee_export.ExportError) as info:
    for patch in ee_export.read_patches(prefix, BANDS):
      read.append(patch.index)
  assert read == [0, 1]
  assert f'{path}: record 2 (patch 2)' in str(info.value)


def test_corrupt_record_bytes(tmp_path):
  prefix = write_export(tmp_path, patch_values(5), compression='')
  path = ee_export.find_export_files(prefix)[0]
  with open(path, 'rb') as f:
    data = bytearray(f.read())
  # All records have one length; flip a payload byte of record 3 (12-byte header, then payload).
  record_size = len(data) // 5
  data[3 * record_size + 20] ^= 0xFF
  with open(path, 'wb') as f:
    f.write(bytes(data))
  read = []
  with pytest.raises(ee_export.ExportError, match='truncated, corrupt') as info:
    for patch in ee_export.read_patches(prefix, BANDS):
      read.append(patch.index)
  assert read == [0, 1, 2]
  assert f'{path}: record 3 (patch 3)' in str(info.value)


def test_record_not_an_example(tmp_path):
  prefix = str(tmp_path / 'ex')
  values = patch_values(2)
  path = write_records(f'{prefix}-00000.tfrecord.gz',
                       [serialize({'VV': values[0, ..., 0], 'VH': values[0, ..., 1]}),
                        b'\xff\xff garbage'])
  write_mixer(prefix, 2, 2)
  with pytest.raises(ee_export.ExportError, match='not a valid tf.train.Example') as info:
    read_all(prefix)
  assert f'{path}: record 1 (patch 1)' in str(info.value)


def test_wrong_compression(tmp_path):
  prefix = write_export(tmp_path, patch_values(2))
  path = ee_export.find_export_files(prefix)[0]
  with pytest.raises(ee_export.ExportError, match='as an uncompressed TFRecord file') as info:
    read_all(prefix, compression='')
  assert f'{path}: record 0' in str(info.value)


def test_missing_band(tmp_path):
  values = patch_values(3)
  prefix = str(tmp_path / 'ex')
  write_records(f'{prefix}-00000.tfrecord.gz', [serialize({'VV': values[0, ..., 0],
                                                           'VH': values[0, ..., 1]})])
  path = write_records(f'{prefix}-00001.tfrecord.gz', [
      serialize({'VV': values[1, ..., 0], 'VH': values[1, ..., 1]}),
      serialize({'VV': values[2, ..., 0]})])
  write_mixer(prefix, 3, 3)
  with pytest.raises(ee_export.ExportError, match="missing band feature 'VH'") as info:
    read_all(prefix)
  # Record 1 of the second shard is patch 2: counting goes on across shards.
  assert f'{path}: record 1 (patch 2)' in str(info.value)
  assert "['VV']" in str(info.value)


def test_wrong_length(tmp_path):
  values = patch_values(3)
  prefix = str(tmp_path / 'ex')
  path = write_records(f'{prefix}-00000.tfrecord.gz', [
      serialize({'VV': values[0, ..., 0], 'VH': values[0, ..., 1]}),
      serialize({'VV': values[1, ..., 0], 'VH': values[1, ..., 1].ravel()[:11]})])
  write_mixer(prefix, 3, 2)
  with pytest.raises(ee_export.ExportError, match="band 'VH' has 11 values, expected 12") as info:
    read_all(prefix)
  assert f'{path}: record 1 (patch 1)' in str(info.value)


def test_wrong_kernel_size_hint(tmp_path):
  prefix = write_export(tmp_path, patch_values(2, height=HEIGHT + 2, width=WIDTH + 2))
  with pytest.raises(ee_export.ExportError, match='kernel_size 3') as info:
    read_all(prefix)  # exported with kernelSize 3, read as 1
  assert 'has 30 values, expected 12' in str(info.value)


def test_wrong_feature_type(tmp_path):
  prefix = str(tmp_path / 'ex')
  record = tf.train.Example(features=tf.train.Features(feature={
      'VV': tf.train.Feature(int64_list=tf.train.Int64List(value=[1] * 12))})).SerializeToString()
  path = write_records(f'{prefix}-00000.tfrecord.gz', [record])
  write_mixer(prefix, 1, 1)
  with pytest.raises(ee_export.ExportError, match="band 'VV' is a int64_list") as info:
    read_all(prefix, ['VV'])
  assert f'{path}: record 0 (patch 0)' in str(info.value)


def test_more_records_than_total_patches(tmp_path):
  prefix = write_export(tmp_path, patch_values(7), total_patches=6, shard_sizes=[4, 3])
  path = ee_export.find_export_files(prefix)[1]
  read = []
  with pytest.raises(ee_export.ExportError, match='totalPatches') as info:
    for patch in ee_export.read_patches(prefix, BANDS):
      read.append(patch.index)
  assert read == list(range(6))
  assert f'{path}: record 2 (patch 6)' in str(info.value)


def test_fewer_records_than_total_patches(tmp_path):
  prefix = write_export(tmp_path, patch_values(5), total_patches=6)
  read = []
  with pytest.raises(ee_export.ExportError, match='hold 5 patches but the mixer') as info:
    for patch in ee_export.read_patches(prefix, BANDS):
      read.append(patch.index)
  assert read == list(range(5))
  assert prefix in str(info.value)
