"""mae_jax.tools.embed: embeddings vs a direct encoder pass, tile metadata, files, no-data, errors."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from data_pipeline import input as data_input
from data_pipeline import schema
from mae_jax import checkpoint as ckpt_lib
from mae_jax.tools import embed
from mae_jax.trainers import pretrain
from mae_jax.models import mae

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Embeddings are float32 computed two ways (sharded batches vs one direct pass), so they agree
# up to summation order.
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope='module')
def saved(pretrained):
  """(full float32 params, checkpoint metadata) of the pretraining run, read back directly."""
  state, metadata = pretrain.restore_state(pretrained[1], pretrained[0])
  return jax.device_get(state['params']), metadata


def read_tiles(data_dir, split):
  """The split's images and small features, in record order, read independently of embed."""
  return data_input.read_split_index(
      data_dir, split, features=(schema.IMAGE, schema.TILE_ID, schema.LAT, schema.LON,
                                 schema.REGION))


def reference(params, model_config, contract, images, pool):
  """Embeddings by a plain (unsharded) encoder pass of the full MAE and numpy pooling."""
  model = mae.model_from_config(model_config, dtype_override=np.float32)
  raw = images.astype(np.float32)
  mean, std = np.asarray(contract['mean']), np.asarray(contract['std'])
  normalised = np.where(np.isfinite(raw), (raw - mean) / std, 0.0).astype(np.float32)
  tokens = np.asarray(model.apply({'params': params}, normalised, method=model.encode)[0])
  p = model.patch_size
  pixel_valid = np.isfinite(raw).any(-1)
  b, h, w = pixel_valid.shape
  patch_valid = pixel_valid.reshape(b, h // p, p, w // p, p).any((2, 4)).reshape(b, -1)
  out = np.full((b, tokens.shape[-1]), np.nan, np.float32)
  for i in range(b):
    if not patch_valid[i].any():
      continue
    out[i] = tokens[i, 0] if pool == 'cls' else tokens[i, 1:][patch_valid[i]].mean(0)
  return out, pixel_valid.mean((1, 2))


def files_in(folder):
  return sorted(os.listdir(folder))


@pytest.mark.parametrize('pool', embed.POOLS)
def test_embeddings_match_a_direct_encoder_pass_and_the_split_index(pretrained, saved, pool):
  workdir, config = pretrained
  data_dir = config.dataset.data_dir
  # 16 tiles in a batch of 24: one padded batch whose padding must be dropped.
  result = embed.embed_split(workdir, data_dir, 'test', pool=pool, batch_size=24)
  cols = result.columns
  tiles = read_tiles(data_dir, 'test')
  assert list(cols) == list(embed.COLUMNS)
  np.testing.assert_array_equal(cols['tile_id'], tiles[schema.TILE_ID].astype(str))
  np.testing.assert_array_equal(cols['region'],
                                np.asarray(schema.REGIONS)[tiles[schema.REGION]])
  np.testing.assert_array_equal(cols['lat'], tiles[schema.LAT])
  np.testing.assert_array_equal(cols['lon'], tiles[schema.LON])
  assert set(cols['split']) == {'test'}
  expected, valid_fraction = reference(saved[0], config.model, saved[1]['input_contract'],
                                       tiles[schema.IMAGE], pool)
  assert cols['embedding'].dtype == np.float32 and cols['embedding'].shape == (16, 32)
  np.testing.assert_allclose(cols['embedding'], expected, **TOLERANCE)
  np.testing.assert_allclose(cols['valid_fraction'], valid_fraction, rtol=1e-6)
  # The synthetic split has no-data borders, so the mean pool did leave patches out.
  assert (cols['valid_fraction'] < 1).any()
  meta = result.metadata
  assert (meta['step'], meta['pool'], meta['width'], meta['weights']) == (3, pool, 32, 'last')
  assert meta['model']['encoder'] == config.model.encoder.to_dict()
  assert meta['input_contract'] == saved[1]['input_contract']


def test_region_filter_keeps_dataset_order_over_padded_batches(pretrained):
  workdir, config = pretrained
  regions = ('europe', 'conus', 'africa')
  result = embed.embed_split(workdir, config.dataset.data_dir, 'test', regions=regions,
                             pool='cls', batch_size=8)
  whole = embed.embed_split(workdir, config.dataset.data_dir, 'test', pool='cls', batch_size=16)
  keep = np.isin(whole.columns['region'], regions)
  assert keep.sum() % 8 and keep.sum() > 8  # Several batches, the last one padded.
  for name in embed.COLUMNS:
    if name == 'embedding':
      np.testing.assert_allclose(result.columns[name], whole.columns[name][keep], **TOLERANCE)
    else:
      np.testing.assert_array_equal(result.columns[name], whole.columns[name][keep])
  assert result.metadata['regions'] == list(regions)
  # Nearest-neighbour sanity: each tile is its own nearest neighbour in the whole split.
  a, b = result.columns['embedding'], whole.columns['embedding']
  distances = ((a[:, None] - b[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(distances.argmin(1), np.flatnonzero(keep))


def test_cli_parquet_and_npz_hold_the_same_values_and_metadata(pretrained, tmp_path):
  workdir, config = pretrained
  data_dir = config.dataset.data_dir
  parquet = str(tmp_path / 'emb.parquet')
  command = [sys.executable, '-m', 'mae_jax.tools.embed', f'--checkpoint={workdir}',
             f'--data_dir={data_dir}', '--split=test', '--pool=mean', f'--output={parquet}',
             '--batch_size=8', '--noprogress']
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                        check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'tiles/s' in done.stdout and '%|' not in done.stderr  # --noprogress: no bar.
  npz = str(tmp_path / 'emb.npz')
  result = embed.embed_to_file(npz, workdir, data_dir, 'test', pool='mean', batch_size=16,
                               command='in-process')
  assert files_in(tmp_path) == ['emb.npz', 'emb.parquet']  # No temporary file left.

  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  schema_ = pq.read_schema(parquet)
  vector = schema_.field('embedding').type
  assert pa.types.is_fixed_size_list(vector)
  assert (vector.list_size, vector.value_type) == (32, pa.float32())
  for name in ('lat', 'lon', 'valid_fraction'):
    assert schema_.field(name).type == pa.float32()
  for name in ('tile_id', 'split', 'region'):
    assert schema_.field(name).type == pa.string()
  from_parquet, parquet_meta = embed.read_embeddings(parquet)
  from_npz, npz_meta = embed.read_embeddings(npz)
  assert np.load(npz)['embedding'].shape == (16, 32)  # Plain arrays, no pickle needed.
  for name in embed.COLUMNS:
    assert from_parquet[name].dtype == from_npz[name].dtype, name
    if name == 'embedding':  # Another process, another batch size: same up to summation order.
      np.testing.assert_allclose(from_parquet[name], from_npz[name], **TOLERANCE)
    else:
      np.testing.assert_array_equal(from_parquet[name], from_npz[name])
    np.testing.assert_array_equal(from_npz[name], result.columns[name])
  assert npz_meta == result.metadata  # Round trip.
  assert parquet_meta['command'] == ' '.join(['python', '-m', 'mae_jax.tools.embed', *command[3:]])
  assert {k: v for k, v in parquet_meta.items() if k != 'command'} == \
      {k: v for k, v in npz_meta.items() if k != 'command'}
  assert pq.read_metadata(parquet).metadata[b'width'] == b'32'  # Plain key-value metadata.


def no_data_copy(source, target):
  """A copy of the dataset whose first test tile has no valid pixel and whose second has no data
  in its top 20 rows except one channel of pixel (0, 0), and every value valid below."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  shutil.copytree(source, target)
  path = os.path.join(target, sorted(p for p in os.listdir(target) if '-test.tfrecord' in p)[0])
  records = [r.numpy() for r in tf.data.TFRecordDataset(path)]
  for i, fill in enumerate(('all', 'top')):
    example = tf.train.Example.FromString(records[i])
    feature = example.features.feature[schema.IMAGE].bytes_list
    image = np.frombuffer(feature.value[0], '<f2').reshape(32, 32, 12).copy()
    if fill == 'all':
      image[:] = np.nan
    else:
      image[20:] = np.nan_to_num(image[20:], nan=-10.0)
      image[:20] = np.nan
      image[0, 0, 5] = -10.0
    feature.value[0] = image.tobytes()
    records[i] = example.SerializeToString()
  with tf.io.TFRecordWriter(path) as writer:
    for record in records:
      writer.write(record)
  return target


def test_no_data_patches_are_left_out_and_empty_tiles_are_nan(pretrained, saved, tmp_path):
  workdir, config = pretrained
  data_dir = no_data_copy(config.dataset.data_dir, str(tmp_path / 'nodata'))
  tiles = read_tiles(data_dir, 'test')
  images = tiles[schema.IMAGE]
  assert np.isnan(images[0].astype(np.float32)).all()
  for pool in embed.POOLS:
    cols = embed.embed_split(workdir, data_dir, 'test', pool=pool, batch_size=16).columns
    assert np.isnan(cols['embedding'][0]).all() and cols['valid_fraction'][0] == 0
    assert np.isfinite(cols['embedding'][1:]).all()
    expected, _ = reference(saved[0], config.model, saved[1]['input_contract'], images, pool)
    np.testing.assert_allclose(cols['embedding'], expected, **TOLERANCE)
  # Tile 1: rows 0-19 invalid but pixel (0, 0) in one channel, so of the four 16 px patches the
  # top-left (one valid value) and both bottom ones count, the top-right does not.
  assert cols['valid_fraction'][1] == pytest.approx((12 * 32 + 1) / 1024)
  valid, patch_valid = embed.patch_validity(images[:2], 16)
  np.testing.assert_array_equal(np.asarray(patch_valid),
                                [[False] * 4, [True, False, True, True]])
  # The mean of those three patch tokens differs from the mean over all four.
  model = mae.model_from_config(config.model, dtype_override=np.float32)
  raw = images[1:2].astype(np.float32)
  contract = saved[1]['input_contract']
  normalised = np.where(np.isfinite(raw), (raw - np.asarray(contract['mean'])) /
                        np.asarray(contract['std']), 0.0).astype(np.float32)
  tokens = np.asarray(model.apply({'params': saved[0]}, normalised, method=model.encode)[0])
  np.testing.assert_allclose(cols['embedding'][1], tokens[0, [1, 3, 4]].mean(0), **TOLERANCE)
  assert not np.allclose(cols['embedding'][1], tokens[0, 1:].mean(0), **TOLERANCE)
  np.testing.assert_array_equal(np.asarray(valid), cols['valid_fraction'][:2])


def write_finetune_checkpoint(saved, workdir, **contract_changes):
  """A fine-tuning checkpoint in the layout mae_jax.trainers.finetune saves: the last params and a 'best'
  copy (the pretrained encoder scaled by 1.1), each with a head, and its metadata; returns the
  best encoder params."""
  params, pre_meta = saved
  encoder = {k: v for k, v in params.items() if k in mae.ENCODER_PARAMS}
  best = jax.tree.map(lambda x: (x * 1.1).astype(x.dtype), encoder)
  head = {'head': {'kernel': np.ones((32, 1), np.float32)}}
  state = {'step': np.int32(4), 'params': {**encoder, **head},
           'best': {'params': {**best, **head}, 'loss': np.float32(1.0), 'step': np.int32(2)}}
  metadata = {'task': 'finetune', 'task_name': 'vcf', 'model': pre_meta['model'],
              'input_contract': {**pre_meta['input_contract'], **contract_changes},
              'config': {**pre_meta['config'], 'select_best': True}}
  checkpointer = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir), async_save=False)
  checkpointer.save(4, state, json.loads(json.dumps(metadata)), force=True)
  checkpointer.close()
  return best


@pytest.fixture(scope='module')
def finetune_checkpoint(saved, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('finetune'))
  return workdir, write_finetune_checkpoint(saved, workdir)


def test_finetuning_checkpoint_reads_the_best_or_the_last_encoder(pretrained, saved,
                                                                   finetune_checkpoint):
  workdir, config = pretrained
  data_dir = config.dataset.data_dir
  step_folder = os.path.join(finetune_checkpoint[0], 'checkpoints', '4')
  last = embed.embed_split(step_folder, data_dir, 'test', use_best=False, batch_size=16)
  best = embed.embed_split(finetune_checkpoint[0], data_dir, 'test', batch_size=16)
  assert (last.metadata['weights'], best.metadata['weights']) == ('last', 'best')
  assert last.metadata['checkpoint_task'] == 'finetune'
  pre = embed.embed_split(workdir, data_dir, 'test', batch_size=16)
  np.testing.assert_allclose(last.columns['embedding'], pre.columns['embedding'], **TOLERANCE)
  params = {**saved[0], **finetune_checkpoint[1]}
  expected, _ = reference(params, config.model, saved[1]['input_contract'],
                          read_tiles(data_dir, 'test')[schema.IMAGE], 'cls')
  np.testing.assert_allclose(best.columns['embedding'], expected, **TOLERANCE)


def test_errors_are_clear_and_leave_nothing_behind(pretrained, saved, tmp_path, tmp_path_factory,
                                                   monkeypatch):
  workdir, config = pretrained
  data_dir = config.dataset.data_dir
  out = str(tmp_path / 'emb.parquet')

  def fails(match, error=ValueError, output=out, checkpoint=workdir, data=data_dir, **kwargs):
    with pytest.raises(error, match=match):
      embed.embed_to_file(output, checkpoint, data, **kwargs)
    assert files_in(tmp_path) == []

  fails(r"extension must be one of \['.npz', '.parquet'\]", output=str(tmp_path / 'emb.csv'))
  fails('output folder .* does not exist', FileNotFoundError,
        output=str(tmp_path / 'missing' / 'emb.npz'), checkpoint='/nonexistent')
  fails(r"no split 'tset'; available", split='tset')
  fails(r"unknown region\(s\) \['atlantis'\]", regions=['europe', 'atlantis'])
  fails('checkpoint path .* does not exist', FileNotFoundError,
        checkpoint=str(tmp_path / 'nowhere'))
  fails('data_dir .* does not exist', FileNotFoundError, data=str(tmp_path / 'nodata'))
  fails('pool must be one of', pool='max')
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  fails('single process, not 2')
  monkeypatch.undo()

  # A checkpoint trained on other data: the differences are named.
  other = str(tmp_path_factory.mktemp('other_contract'))
  write_finetune_checkpoint(saved, other, clip_range=(-40.0, 20.0))
  fails(r'differs from the data the checkpoint .* clip_range: \(-40.0, 20.0\) != \(-50.0, 30.0\)',
        checkpoint=other)

  # A failure while writing removes the temporary file.
  columns = {'tile_id': np.array(['a', 'b']), 'split': np.array(['test'] * 2),
             'region': np.array(['europe', 'china']), 'lat': np.zeros(2), 'lon': np.zeros(2),
             'valid_fraction': np.ones(2), 'embedding': np.ones((2, 4), np.float32)}
  with pytest.raises(TypeError):
    embed.write_embeddings(str(tmp_path / 'emb.npz'), columns, {'bad': object()})
  assert files_in(tmp_path) == []

  def broken_replace(*_):
    raise OSError('disk full')
  monkeypatch.setattr(os, 'replace', broken_replace)
  with pytest.raises(OSError, match='disk full'):
    embed.write_embeddings(out, columns, {'pool': 'cls'})
  assert files_in(tmp_path) == []
  monkeypatch.undo()
  with pytest.raises(ValueError, match='columns differ in length'):
    embed.write_embeddings(out, {**columns, 'lat': np.zeros(3)}, {})
  assert files_in(tmp_path) == []


# --- Footprints and GeoParquet ------------------------------------------------------------------

# UTM's scale on its central meridian and WGS 84's metres per degree at the equator (latitude
# along the meridian, longitude along the equator): the truths of a tile at the equator.
UTM_SCALE = 0.9996
METRES_PER_DEGREE_LAT, METRES_PER_DEGREE_LON = 110_574.3, 111_319.49


def georeferenced_copy(source, target, antimeridian_origin):
  """A copy of the dataset whose first three test tiles carry a CRS and transform: at the
  equator on UTM 33N's central meridian (15 E), in EPSG:4326 at (10 E, 50 N) with 1/1024 degree
  pixels, and across the antimeridian in UTM 60N; the others stay without a georeference. Values
  are exact in float32, as the transform feature is stored."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  shutil.copytree(source, target)
  georeference = [('EPSG:32633', (10.0, 0.0, 500_000.0, 0.0, -10.0, 320.0)),
                  ('EPSG:4326', (2.0**-10, 0.0, 10.0, 0.0, -2.0**-10, 50.0)),
                  ('EPSG:32660', (10.0, 0.0, antimeridian_origin[0], 0.0, -10.0,
                                  antimeridian_origin[1]))]
  for name in sorted(p for p in os.listdir(target) if '-test.tfrecord' in p):  # File order.
    path = os.path.join(target, name)
    records = [r.numpy() for r in tf.data.TFRecordDataset(path)]
    for i in range(min(len(records), len(georeference))):
      crs, transform = georeference.pop(0)
      example = tf.train.Example.FromString(records[i])
      example.features.feature[schema.CRS].bytes_list.value[:] = [crs.encode()]
      example.features.feature[schema.TRANSFORM].float_list.value[:] = transform
      records[i] = example.SerializeToString()
    with tf.io.TFRecordWriter(path) as writer:
      for record in records:
        writer.write(record)
  return target


def parse_wkb_polygon(data):
  """(byte order, type, rings, points) and the (K, 2) ring, unpacked here from the bytes."""
  import struct  # pylint: disable=g-import-not-at-top
  header = struct.unpack_from('<BIII', data)
  return header, np.array(struct.unpack_from(f'<{2 * header[3]}d', data, 13)).reshape(-1, 2)


@pytest.fixture(scope='module')
def geoparquet(pretrained, tmp_path_factory):
  """(parquet path, npz path, in-process result) of the georeferenced copy's test split."""
  import rasterio.warp  # pylint: disable=g-import-not-at-top
  workdir, config = pretrained
  # A UTM 60N origin 160 m west of the antimeridian at 45 N (whole metres).
  x, y = rasterio.warp.transform('OGC:CRS84', 'EPSG:32660', [180.0], [45.0])
  folder = tmp_path_factory.mktemp('geo')
  data_dir = georeferenced_copy(config.dataset.data_dir, str(folder / 'data'),
                                (float(round(x[0]) - 160), float(round(y[0]))))
  parquet, npz = str(folder / 'emb.parquet'), str(folder / 'emb.npz')
  result = embed.embed_to_file(parquet, workdir, data_dir, 'test', batch_size=16)
  embed.write_embeddings(npz, result.columns, result.metadata)
  return parquet, npz, result


def test_footprints_are_the_tiles_outlines_in_crs84(geoparquet):
  footprint = geoparquet[2].columns['footprint']
  assert footprint.shape == (16, 5, 2) and footprint.dtype == np.float64
  np.testing.assert_array_equal(footprint[:, 0], footprint[:, -1])  # Closed rings.
  # Tile 0: 320 m squares at the equator on 15 E, so the corners follow from UTM's scale.
  top = 320 / (UTM_SCALE * METRES_PER_DEGREE_LAT)
  east = 15 + 320 / (UTM_SCALE * METRES_PER_DEGREE_LON)
  np.testing.assert_allclose(footprint[0, :4], [[15, top], [15, 0], [east, 0], [east, top]],
                             rtol=0, atol=1e-7)
  # Tile 1 is in longitude / latitude already: its grid's corners exactly.
  side = 32 * 2.0**-10
  np.testing.assert_array_equal(footprint[1, :4], [[10, 50], [10, 50 - side],
                                                   [10 + side, 50 - side], [10 + side, 50]])
  # Tile 2 crosses the antimeridian: longitudes stay continuous (179.99.. and 180.00..).
  lon = footprint[2, :, 0]
  assert np.ptp(lon) < 0.01 and lon.min() < 180 < lon.max()
  assert 44.99 < footprint[2, :, 1].min() and footprint[2, :, 1].max() < 45.01
  for ring in footprint[:3]:  # Counterclockwise: positive shoelace area.
    x, y = ring[:-1, 0], ring[:-1, 1]
    assert (x * np.roll(y, -1) - np.roll(x, -1) * y).sum() > 0
  assert np.isnan(footprint[3:]).all()  # The synthetic tiles: no georeference.


def test_parquet_is_geoparquet_with_wkb_polygons_and_crs84(geoparquet):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  import rasterio.crs  # pylint: disable=g-import-not-at-top
  parquet, npz, result = geoparquet
  footprint = result.columns['footprint']
  table = pq.read_table(parquet)
  assert table.schema.field('geometry').type == pa.binary()
  assert 'footprint' not in table.column_names
  geo = json.loads(pq.read_metadata(parquet).metadata[b'geo'])
  assert geo['version'] == '1.1.0' and geo['primary_column'] == 'geometry'
  column = geo['columns']['geometry']
  assert (column['encoding'], column['geometry_types']) == ('WKB', ['Polygon'])
  assert column['orientation'] == 'counterclockwise'
  # The PROJJSON is OGC:CRS84 to GDAL.
  crs = rasterio.crs.CRS.from_user_input(json.dumps(column['crs']))
  assert crs.to_authority() == ('OGC', 'CRS84') and crs == rasterio.crs.CRS.from_user_input(
      'OGC:CRS84')
  known = footprint[:3].reshape(-1, 2)
  np.testing.assert_array_equal(column['bbox'], [*known.min(0), *known.max(0)])
  geometries = table.column('geometry').to_pylist()
  for i, data in enumerate(geometries):
    if i >= 3:
      assert data is None  # Null geometry for a tile without a georeference.
      continue
    header, ring = parse_wkb_polygon(data)
    assert header == (1, 3, 1, 5) and len(data) == 13 + 5 * 16  # Little-endian polygon.
    np.testing.assert_array_equal(ring, footprint[i])
  # Both formats read back the same footprints; the geo entry is not run metadata.
  from_parquet, parquet_meta = embed.read_embeddings(parquet)
  from_npz, npz_meta = embed.read_embeddings(npz)
  np.testing.assert_array_equal(from_parquet['footprint'], footprint)
  np.testing.assert_array_equal(from_npz['footprint'], footprint)
  assert 'geo' not in parquet_meta and parquet_meta == npz_meta


def test_geopandas_reads_the_geoparquet(geoparquet):
  geopandas = pytest.importorskip('geopandas')
  frame = geopandas.read_parquet(geoparquet[0])
  assert frame.crs.to_string() in ('OGC:CRS84', 'EPSG:4326')
  assert frame.geometry.iloc[:3].geom_type.tolist() == ['Polygon'] * 3
  assert frame.geometry.iloc[3:].isna().all()
  np.testing.assert_allclose(np.asarray(frame.geometry.iloc[1].exterior.coords),
                             geoparquet[2].columns['footprint'][1])


def test_files_without_footprints_still_write_and_read(tmp_path):
  columns = {'tile_id': np.array(['a', 'b']), 'split': np.array(['test'] * 2),
             'region': np.array(['europe', 'china']), 'lat': np.zeros(2), 'lon': np.zeros(2),
             'valid_fraction': np.ones(2), 'embedding': np.ones((2, 4), np.float32)}
  for name in ('emb.parquet', 'emb.npz'):
    embed.write_embeddings(str(tmp_path / name), columns, {'pool': 'cls'})
    read, _ = embed.read_embeddings(str(tmp_path / name))
    assert read['footprint'].shape == (2, 5, 2) and np.isnan(read['footprint']).all()
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  assert pq.read_table(str(tmp_path / 'emb.parquet')).column('geometry').null_count == 2
  assert 'bbox' not in json.loads(
      pq.read_metadata(str(tmp_path / 'emb.parquet')).metadata[b'geo'])['columns']['geometry']
  with pytest.raises(ValueError, match=r'footprint must be \(N, 5, 2\)'):
    embed.write_embeddings(str(tmp_path / 'bad.npz'), {**columns,
                                                        'footprint': np.zeros((2, 4, 2))}, {})
