r"""One embedding per tile from a pretrained or fine-tuned MAE encoder, written to Parquet or npz.

  python -m mae_jax.tools.embed --checkpoint PATH --data_dir DIR [--split test] \
      [--regions europe,conus] [--pool cls|mean] --output emb.parquet|emb.npz \
      [--batch_size 64] [--use_best=true] [--noprogress]

``PATH`` is a pretraining or fine-tuning workdir (its latest step), its ``checkpoints/`` folder
or one ``checkpoints/<step>`` folder. Only the encoder params (``mae.ENCODER_PARAMS``) are read;
from a fine-tuning checkpoint, with ``--use_best``, the copy its run selected (lowest validation
loss) when the run selected one. The encoder is rebuilt from the checkpoint's metadata and runs in
float32 (whatever dtype it trained in) at full matmul precision, so embeddings are reproducible.
Tiles are decoded as their dataset stores them (float16 dB or uint8 codes, on the device) and
normalised with the checkpoint's input-contract statistics; a dataset made otherwise (other
bands, units, clipping, ...) is an error naming the differences, one only stored otherwise is
accepted (``schema.InputContract.differences``).

Pooling, over the encoder's tokens after its final LayerNorm (every patch visible, no masking):

* ``cls``: the cls token.
* ``mean``: the mean of the patch tokens (cls left out) over the *valid* patches, those with at
  least one valid pixel.

A pixel is valid when at least one of its channels is finite (not no-data). ``valid_fraction``
is the fraction of the tile's pixels that are valid. A tile without any valid pixel has no
embedding in either pool: its row is NaN (its tokens would describe only the zero fill that
normalisation puts in place of no-data) and its ``valid_fraction`` is 0.

Output, one row per tile in dataset order (file order; a region filter keeps that order):
``tile_id``, ``split``, ``region`` (name), ``lat``, ``lon``, ``valid_fraction`` (float32),
``embedding`` (float32, width D) and ``footprint``: the outline of the tile's pixel grid as a
closed, counterclockwise ring of 5 (longitude, latitude) points in OGC:CRS84 (WGS 84, longitude
first), float64 (N, 5, 2). Footprints come from each tile's recorded CRS and affine transform
(``schema.CRS``, ``schema.TRANSFORM``): its four corners projected to CRS84, joined by straight
edges (a 4.5 km UTM tile's edges bend far less than a pixel in longitude/latitude); one CRS for
the whole file, as GeoParquet requires, although a file's tiles lie in several UTM zones. A
footprint that crosses the antimeridian keeps continuous longitudes (some beyond 180). Tiles
without a georeference (no CRS or a NaN transform: the synthetic and the embedded datasets) have
a NaN footprint.

Parquet is GeoParquet 1.1.0, readable by ``geopandas.read_parquet``: the footprint is the
``geometry`` column of WKB polygons (null for a NaN footprint), described by the ``geo`` file
metadata (encoding WKB, geometry types Polygon, the CRS84 PROJJSON, counterclockwise
orientation, bounding box). The embedding is a fixed-size list<float32> of width D, and the run's
metadata (checkpoint folder and step, weights, pool, width, encoder architecture, input contract,
the command, ...) is file key-value metadata, each value JSON. npz holds arrays of the same names
(``embedding`` (N, D), ``footprint`` (N, 5, 2), texts as unicode arrays, so ``np.load`` needs no
pickle) plus ``metadata``, the same dict as one JSON string. The format follows the extension
(``.parquet`` or ``.npz``). The file is written under a temporary name
beside the output and renamed into place, so a failed run leaves nothing behind; a missing output
folder is an error before any work.

The run uses every local device: a data-parallel mesh (params replicated: the encoder alone fits
one device even for ViT-H), the global batch rounded up to a multiple of the device count, the
last batch padded and the padding dropped. It runs in one process only.

In Python: ``embed_split(...)`` returns the columns and metadata; ``write_embeddings`` and
``read_embeddings`` write and read either format; ``embed_to_file`` is what the command does.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import struct
import sys
import time
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from data_pipeline import input as data_input
from data_pipeline import quantise
from data_pipeline import schema
from mae_jax import checkpoint as ckpt_lib
from mae_jax import preprocess
from mae_jax import sharding
from mae_jax import validate
from mae_jax.models import mae

POOLS = ('cls', 'mean')
FORMATS = {'.parquet': 'parquet', '.npz': 'npz'}
COLUMNS = ('tile_id', 'split', 'region', 'lat', 'lon', 'valid_fraction', 'embedding',
           'footprint')
OPTIONAL_COLUMNS = ('footprint',)  # write_embeddings writes NaN (no geometry) without it.
RING = 5  # Points of a footprint: 4 corners, the first repeated.
GEOMETRY = 'geometry'  # The Parquet column of the footprints (WKB polygons).
GEOPARQUET_VERSION = '1.1.0'
FOOTPRINT_CRS = 'OGC:CRS84'
# PROJJSON of OGC:CRS84 (WGS 84, longitude then latitude), as GDAL 3.10 writes it
# (tests/test_embed.py checks that GDAL reads it back as OGC:CRS84).
CRS84_PROJJSON = {
    '$schema': 'https://proj.org/schemas/v0.7/projjson.schema.json',
    'type': 'GeographicCRS', 'name': 'WGS 84 (CRS84)',
    'datum': {'type': 'GeodeticReferenceFrame', 'name': 'World Geodetic System 1984',
              'ellipsoid': {'name': 'WGS 84', 'semi_major_axis': 6378137,
                            'inverse_flattening': 298.257223563}},
    'coordinate_system': {'subtype': 'ellipsoidal', 'axis': [
        {'name': 'Geodetic longitude', 'abbreviation': 'Lon', 'direction': 'east',
         'unit': 'degree'},
        {'name': 'Geodetic latitude', 'abbreviation': 'Lat', 'direction': 'north',
         'unit': 'degree'}]},
    'scope': 'unknown', 'area': 'World',
    'bbox': {'south_latitude': -90, 'west_longitude': -180, 'north_latitude': 90,
             'east_longitude': 180},
    'id': {'authority': 'OGC', 'code': 'CRS84'}}
# Fields of config.model that fix the encoder (as in finetune.ENCODER_ARCHITECTURE_FIELDS).
ENCODER_FIELDS = ('image_size', 'patch_size', 'num_channels', 'encoder', 'pos_embedding',
                  'scan_layers')
_FEATURES = (schema.IMAGE, schema.TILE_ID, schema.LAT, schema.LON, schema.REGION)
_GEOREFERENCE = (schema.CRS, schema.TRANSFORM)  # Read when the dataset has them.


class Embeddings(NamedTuple):
  """What :func:`embed_split` returns."""
  columns: dict[str, np.ndarray]  # COLUMNS, one row per tile.
  metadata: dict[str, Any]  # JSON-able description of the run.
  seconds: float  # Wall time of the pass over the data, compilation excluded.


class Encoder(mae.MaskedAutoencoder):
  """Just the encoder of :class:`mae.MaskedAutoencoder` (its param names, ``ENCODER_PARAMS``).

  The full module's setup also declares the decoder's params, which an encoder-only restore
  does not have; ``DownstreamModel`` builds its encoder the same way.
  """

  def setup(self):
    self._setup_encoder()

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.encode(images)[0]


# --- Pooling --------------------------------------------------------------------------------


def patch_validity(images: jax.Array, patch_size: int) -> tuple[jax.Array, jax.Array]:
  """(valid_fraction (B,), patch_valid (B, L)) of raw (B, H, W, C) tiles, NaN = no data.

  A pixel is valid when any of its channels is finite; a patch when any of its pixels is.
  """
  pixel_valid = jnp.isfinite(images.astype(jnp.float32)).any(axis=-1)
  valid_fraction = pixel_valid.astype(jnp.float32).mean(axis=(1, 2))
  patch_valid = mae.patchify(pixel_valid[..., None], patch_size).any(axis=-1)
  return valid_fraction, patch_valid


def pool_tokens(tokens: jax.Array, patch_valid: jax.Array, pool: str) -> jax.Array:
  """(B, 1 + L, D) tokens, cls first -> (B, D) float32 by ``pool``; NaN rows for tiles without a
  valid patch (see the module docstring)."""
  if pool not in POOLS:
    raise ValueError(f'pool must be one of {POOLS}, got {pool!r}')
  tokens = tokens.astype(jnp.float32)
  weight = patch_valid.astype(jnp.float32)
  if pool == 'cls':
    pooled = tokens[:, 0]
  else:
    count = weight.sum(axis=1, keepdims=True)
    pooled = jnp.einsum('bld,bl->bd', tokens[:, 1:], weight) / jnp.maximum(count, 1.0)
  return jnp.where(patch_valid.any(axis=1, keepdims=True), pooled, jnp.nan)


def embed_step(params, images, *, model, mean, std, pool, storage=quantise.FLOAT16):
  """Stored tiles (B, H, W, C) in ``storage`` -> (embeddings (B, D) float32, valid_fraction
  (B,))."""
  images = preprocess.decode(images, storage)  # float32 dB, NaN = no-data.
  normalised, _ = preprocess.normalise(images, mean, std)
  tokens = model.apply({'params': params}, normalised)
  valid_fraction, patch_valid = patch_validity(images, model.patch_size)
  return pool_tokens(tokens, patch_valid, pool), valid_fraction


# --- Footprints -----------------------------------------------------------------------------


def tile_footprints(crs_names: Sequence[str], transforms: np.ndarray,
                    tile_size: int) -> np.ndarray:
  """(N, 5, 2) float64 footprints (see the module docstring) of tiles of ``tile_size`` px.

  Args:
    crs_names: Each tile's CRS (``schema.CRS``: 'EPSG:32633', WKT, ...; '' if none).
    transforms: (N, 6) affine transforms (a, b, c, d, e, f), pixel (col, row) -> CRS (x, y).
    tile_size: Pixels per side.

  Raises:
    ValueError: A CRS that GDAL cannot read, naming it.
  """
  crs_names = np.asarray([str(c) for c in crs_names], dtype=object)
  transforms = np.asarray(transforms, np.float64).reshape(len(crs_names), 6)
  out = np.full((len(crs_names), RING, 2), np.nan)
  known = (crs_names != '') & np.isfinite(transforms).all(axis=1)
  if not known.any():
    return out
  import rasterio.errors  # pylint: disable=g-import-not-at-top
  import rasterio.warp  # pylint: disable=g-import-not-at-top
  # Top-left, bottom-left, bottom-right, top-right corners of the grid, as (col, row).
  cols = np.array([0.0, 0.0, tile_size, tile_size])
  rows = np.array([0.0, tile_size, tile_size, 0.0])
  names, transforms = crs_names[known], transforms[known]
  a, b, c, d, e, f = (transforms[:, i:i + 1] for i in range(6))
  x, y = a * cols + b * rows + c, d * cols + e * rows + f  # (K, 4) each.
  corners = np.empty((len(names), 4, 2))
  for name in dict.fromkeys(names):
    same = names == name
    try:
      lon, lat = rasterio.warp.transform(name, FOOTPRINT_CRS, x[same].ravel().tolist(),
                                         y[same].ravel().tolist())
    except rasterio.errors.CRSError as error:
      raise ValueError(f'tile CRS {name!r} cannot be read: {error}') from error
    corners[same] = np.stack([np.reshape(lon, (-1, 4)), np.reshape(lat, (-1, 4))], axis=-1)
  lon = corners[..., 0]
  wraps = np.ptp(lon, axis=1) > 180  # Across the antimeridian: continuous longitudes.
  corners[wraps, :, 0] = np.where(lon[wraps] < 0, lon[wraps] + 360.0, lon[wraps])
  # Counterclockwise in (lon, lat) when the shoelace area is positive; a south-up or mirrored
  # transform gives a clockwise one, reversed here.
  px, py = corners[..., 0], corners[..., 1]
  area = (px * np.roll(py, -1, axis=1) - np.roll(px, -1, axis=1) * py).sum(axis=1)
  corners = np.where((area < 0)[:, None, None], corners[:, ::-1], corners)
  out[known] = np.concatenate([corners, corners[:, :1]], axis=1)
  return out


def polygon_wkb(ring: np.ndarray) -> bytes | None:
  """Little-endian WKB of the polygon with one exterior ``ring`` (K, 2); None if it is NaN."""
  ring = np.asarray(ring, '<f8')
  if not np.isfinite(ring).all():
    return None
  return struct.pack('<BIII', 1, 3, 1, len(ring)) + ring.tobytes()


def wkb_ring(data: bytes | None) -> np.ndarray:
  """The exterior ring (K, 2) of a WKB polygon written by :func:`polygon_wkb`; NaN (RING, 2) for
  None (a null geometry)."""
  if data is None:
    return np.full((RING, 2), np.nan)
  order = {0: '>', 1: '<'}.get(data[0])
  if order is None:
    raise ValueError(f'not WKB: byte order {data[0]}')
  kind, rings, points = struct.unpack_from(order + 'III', data, 1)
  if kind != 3 or rings < 1:
    raise ValueError(f'WKB geometry type {kind} with {rings} rings; expected a polygon')
  return np.frombuffer(data, order + 'f8', 2 * points, 13).reshape(points, 2).astype(np.float64)


def geo_metadata(footprints: np.ndarray) -> dict[str, Any]:
  """GeoParquet's ``geo`` file metadata of a ``geometry`` column of these footprints."""
  column = {'encoding': 'WKB', 'geometry_types': ['Polygon'], 'crs': CRS84_PROJJSON,
            'edges': 'planar', 'orientation': 'counterclockwise'}
  known = np.isfinite(footprints).all(axis=(1, 2))
  if known.any():
    points = footprints[known].reshape(-1, 2)
    column['bbox'] = [float(v) for v in (*points.min(axis=0), *points.max(axis=0))]
  return {'version': GEOPARQUET_VERSION, 'primary_column': GEOMETRY,
          'columns': {GEOMETRY: column}}


# --- Checkpoint -----------------------------------------------------------------------------


def encoder_from_metadata(metadata: Mapping[str, Any]) -> Encoder:
  """The float32 encoder of a checkpoint's ``metadata['model']``."""
  model_config = ml_collections.ConfigDict(dict(metadata['model']))
  model_config.attention_implementation = 'auto'  # This machine's choice, not the run's.
  validate.check_model(model_config)
  full = mae.model_from_config(model_config, dtype_override=jnp.float32)
  return Encoder(**mae.module_fields(full))


def weights_source(metadata: Mapping[str, Any], use_best: bool) -> str | None:
  """'best' when the weights to read are a fine-tuning run's selected copy, else None."""
  if metadata.get('task') != 'finetune' or not use_best:
    return None
  return 'best' if metadata.get('config', {}).get('select_best', True) else None


def restore_encoder_params(directory: str, step: int, model: Encoder, source: str | None,
                           mesh, rules):
  """The encoder params of ``directory/step`` (or of its ``source`` copy), sharded on ``mesh``.

  Call under ``jax.set_mesh(mesh)`` and the logical rules.
  """
  dummy = jnp.zeros((1, model.image_size, model.image_size, model.num_channels), jnp.float32)
  init = lambda rng: model.init(rng, dummy)['params']
  specs = nn.get_partition_spec(jax.eval_shape(init, jax.random.key(0)))
  abstract = jax.eval_shape(lambda rng: nn.meta.unbox(init(rng)), jax.random.key(0))
  target = {'params': ckpt_lib.abstract_like(abstract,
                                             sharding.logical_to_shardings(specs, mesh, rules))}
  restored = ckpt_lib.restore_subtree(directory, step, {source: target} if source else target)
  return (restored[source] if source else restored)['params']


# --- Embedding ------------------------------------------------------------------------------


def _check_regions(regions: Sequence[str] | None) -> tuple[str, ...] | None:
  if not regions:
    return None
  regions = tuple(dict.fromkeys(regions))
  unknown = [r for r in regions if r not in schema.REGIONS]
  if unknown:
    raise ValueError(f'unknown region(s) {unknown}; known regions: {list(schema.REGIONS)}')
  return regions


def _records_of_regions(data_dir: str, split: str, regions: tuple[str, ...]) -> np.ndarray:
  index = data_input.read_split_index(data_dir, split, features=(schema.REGION,))
  wanted = [schema.REGIONS.index(r) for r in regions]
  records = np.flatnonzero(np.isin(index[schema.REGION], wanted))
  if not records.size:
    raise ValueError(f'{data_dir}: split {split!r} has no tile of region(s) {list(regions)}')
  return records


def embed_split(checkpoint: str, data_dir: str, split: str = 'test', *,
                regions: Sequence[str] | None = None, pool: str = 'cls', batch_size: int = 64,
                use_best: bool = True, progress: bool = False) -> Embeddings:
  """Embeds every tile of ``split`` (of ``regions``, if given) with a checkpoint's encoder.

  Args:
    checkpoint: A pretraining or fine-tuning workdir, its checkpoints folder or one step folder.
    data_dir: A dataset folder written by ``data_pipeline``.
    split: Split name.
    regions: Region names to keep (``schema.REGIONS``); None or empty for all.
    pool: ``'cls'`` or ``'mean'`` (see the module docstring).
    batch_size: Global batch; rounded up to a multiple of the device count.
    use_best: Fine-tuning checkpoints: read the selected ('best') copy when the run kept one.
    progress: Show a tqdm bar on stderr.

  Returns:
    ``Embeddings(columns, metadata, seconds)``.

  Raises:
    ValueError: Bad arguments, an unknown split or region, a checkpoint of another kind, data
      that differ from the checkpoint's input contract, more than one process.
    FileNotFoundError: No checkpoint or no dataset at the given path.
  """
  if jax.process_count() > 1:
    raise ValueError(f'mae_jax.tools.embed runs in a single process, not {jax.process_count()}: run '
                     'it on one host (it uses all of that host\'s devices)')
  if pool not in POOLS:
    raise ValueError(f'pool must be one of {POOLS}, got {pool!r}')
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  regions = _check_regions(regions)
  if not data_dir or not epath.Path(data_dir).exists():
    raise FileNotFoundError(f'data_dir {data_dir!r} does not exist')

  directory, step = ckpt_lib.locate(checkpoint)
  where = f'{directory}/{step}'
  metadata = ckpt_lib.read_metadata(directory, step)
  if metadata.get('task') not in ('pretrain', 'finetune') or not metadata.get('model'):
    raise ValueError(f'{where} is not a mae_jax pretraining or fine-tuning checkpoint (task '
                     f'{metadata.get("task")!r})')
  contract = schema.InputContract.from_dict(metadata['input_contract'])

  records = _records_of_regions(data_dir, split, regions) if regions else None
  dataset = data_input.HostDataset(data_dir, split, records=records)
  differences = contract.differences(dataset.contract)
  if differences:
    raise ValueError(f'{data_dir} differs from the data the checkpoint {where} was trained on: '
                     + '; '.join(differences))
  model = encoder_from_metadata(metadata)
  validate.check_data(model, data_dir, dataset.num_channels, dataset.tile_size)
  mean, std = np.asarray(contract.mean, np.float32), np.asarray(contract.std, np.float32)
  storage = quantise.form_of(dataset.contract)  # The data's own form decodes them.

  mesh = sharding.create_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, num_devices=0)))
  rules = sharding.rules_from_config(metadata.get('config', {}).get('logical_rules', ()))
  devices = sharding.data_parallel_size(mesh)
  batch = -(-batch_size // devices) * devices
  batch_sharding = sharding.batch_sharding(mesh)
  source = weights_source(metadata, use_best)
  # Full-precision float32 matmuls: accelerators would otherwise use TF32 / bfloat16 passes.
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules), jax.default_matmul_precision('highest'):
    params = restore_encoder_params(directory, step, model, source, mesh, rules)
    step_fn = jax.jit(functools.partial(embed_step, model=model, mean=mean, std=std, pool=pool,
                                        storage=storage),
                      out_shardings=batch_sharding)
    image_shape = jax.ShapeDtypeStruct(
        (batch, dataset.tile_size, dataset.tile_size, dataset.num_channels),
        storage.np_dtype, sharding=batch_sharding)
    compiled = step_fn.lower(params, image_shape).compile()
    columns, seconds = _run(compiled, params, dataset, batch, batch_sharding, progress)
  columns['split'] = np.full(len(columns['tile_id']), split)
  if schema.CRS in columns:
    columns['footprint'] = tile_footprints(columns.pop(schema.CRS),
                                           columns.pop(schema.TRANSFORM), dataset.tile_size)
  else:  # A dataset written before tiles recorded their CRS and transform.
    columns['footprint'] = np.full((len(columns['tile_id']), RING, 2), np.nan)
  columns = {name: columns[name] for name in COLUMNS}
  width = int(columns['embedding'].shape[1])
  info = {
      'checkpoint': directory, 'step': step, 'checkpoint_task': metadata['task'],
      'weights': source or 'last', 'pool': pool, 'width': width,
      'model': {k: metadata['model'].get(k) for k in ENCODER_FIELDS},
      'dtype': 'float32', 'input_contract': contract.to_dict(), 'data_dir': data_dir,
      'split': split, 'regions': list(regions) if regions else None,
      'num_tiles': len(columns['tile_id']), 'command': None,
  }
  # Through JSON once, so the dict equals what a file gives back (lists, not tuples).
  return Embeddings(columns, json.loads(json.dumps(info)), seconds)


def _run(compiled, params, dataset, batch: int, batch_sharding, progress: bool):
  """Runs ``compiled`` over the dataset; returns (columns but 'split' and 'footprint', plus
  the tiles' CRS and transform features when the dataset has them, seconds)."""
  import tqdm  # pylint: disable=g-import-not-at-top
  info = getattr(dataset, 'info', None) or dataset.builder.info
  georeference = tuple(name for name in _GEOREFERENCE if name in info.features)
  if len(georeference) < len(_GEOREFERENCE):
    georeference = ()
  out = {name: [] for name in ('tile_id', 'region', 'lat', 'lon', 'valid_fraction',
                               'embedding') + georeference}

  def collect(real, host_batch, result):
    embedding, valid_fraction = jax.device_get(result)
    out['embedding'].append(np.asarray(embedding, np.float32)[real])
    out['valid_fraction'].append(np.asarray(valid_fraction, np.float32)[real])
    for name in ('tile_id', 'region', 'lat', 'lon') + georeference:
      out[name].append(host_batch[name][real])
    bar.update(int(real.sum()))

  start = time.perf_counter()
  pending = None
  with tqdm.tqdm(total=dataset.num_examples, unit='tile', file=sys.stderr,
                 disable=not progress, dynamic_ncols=True) as bar:
    for host_batch in dataset.eval_batches(batch, features=_FEATURES + georeference):
      real = host_batch.pop(data_input.EXAMPLE_MASK)
      images = jax.make_array_from_process_local_data(batch_sharding, host_batch[schema.IMAGE])
      result = compiled(params, images)
      # Fetching the previous batch only now keeps the device busy while the host waits.
      if pending is not None:
        collect(*pending)
      pending = (real, host_batch, result)
    if pending is not None:
      collect(*pending)
  seconds = time.perf_counter() - start
  columns = {k: np.concatenate(v) for k, v in out.items()}
  for name in ('tile_id',) + georeference[:1]:  # Texts.
    columns[name] = np.asarray([t.decode() if isinstance(t, bytes) else str(t)
                                for t in columns[name]], dtype=str)
  columns['region'] = np.asarray(schema.REGIONS)[columns['region'].astype(np.int64)]
  columns['lat'] = columns['lat'].astype(np.float32)
  columns['lon'] = columns['lon'].astype(np.float32)
  return columns, seconds


# --- Files ----------------------------------------------------------------------------------


def output_format(path: str) -> str:
  """'parquet' or 'npz' from the extension of ``path``; anything else is a ValueError."""
  extension = os.path.splitext(path)[1].lower()
  if extension not in FORMATS:
    raise ValueError(f'output {path!r}: the extension must be one of {sorted(FORMATS)} (it '
                     'picks the format)')
  return FORMATS[extension]


def check_output(path: str) -> str:
  """The format of ``path``, after checking that its folder exists (before any work)."""
  if not path:
    raise ValueError('output path is empty')
  fmt = output_format(path)
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'output folder {folder!r} does not exist; create it first')
  if os.path.isdir(path):
    raise ValueError(f'output {path!r} is a folder')
  return fmt


def _check_columns(columns: Mapping[str, np.ndarray]) -> int:
  missing = [name for name in COLUMNS if name not in columns and name not in OPTIONAL_COLUMNS]
  if missing:
    raise ValueError(f'columns {missing} are missing; expected {list(COLUMNS)}')
  embedding = np.asarray(columns['embedding'])
  if embedding.ndim != 2:
    raise ValueError(f'embedding must be (N, D), got shape {embedding.shape}')
  rows = {name: len(columns[name]) for name in COLUMNS if name in columns}
  if len(set(rows.values())) != 1:
    raise ValueError(f'columns differ in length: {rows}')
  if 'footprint' in columns and np.shape(columns['footprint'])[1:] != (RING, 2):
    raise ValueError(f'footprint must be (N, {RING}, 2), got shape '
                     f'{np.shape(columns["footprint"])}')
  return embedding.shape[0]


def write_embeddings(path: str, columns: Mapping[str, np.ndarray],
                     metadata: Mapping[str, Any]) -> None:
  """Writes ``columns`` (:data:`COLUMNS`) and ``metadata`` to ``path`` (.parquet or .npz),
  atomically: a temporary file beside it, renamed into place, removed on any error."""
  fmt = check_output(path)
  rows = _check_columns(columns)
  footprint = np.asarray(columns['footprint'], np.float64) if 'footprint' in columns else \
      np.full((rows, RING, 2), np.nan)
  strings = {name: np.asarray(columns[name]).astype(str) for name in ('tile_id', 'split',
                                                                       'region')}
  floats = {name: np.asarray(columns[name], np.float32) for name in ('lat', 'lon',
                                                                      'valid_fraction')}
  embedding = np.ascontiguousarray(columns['embedding'], np.float32)
  path = os.path.abspath(path)
  tmp = os.path.join(os.path.dirname(path), f'.{os.path.basename(path)}.tmp-{os.getpid()}')
  try:
    if fmt == 'parquet':
      import pyarrow as pa  # pylint: disable=g-import-not-at-top
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
      arrays = {**{k: pa.array(v.tolist(), pa.string()) for k, v in strings.items()},
                **{k: pa.array(v, pa.float32()) for k, v in floats.items()},
                'embedding': pa.FixedSizeListArray.from_arrays(
                    pa.array(embedding.reshape(-1), pa.float32()), embedding.shape[1]),
                GEOMETRY: pa.array([polygon_wkb(ring) for ring in footprint], pa.binary())}
      table = pa.table({name: arrays[name]
                        for name in [c for c in COLUMNS if c != 'footprint'] + [GEOMETRY]})
      file_metadata = {k: json.dumps(v) for k, v in metadata.items()}
      file_metadata['geo'] = json.dumps(geo_metadata(footprint))
      table = table.replace_schema_metadata(file_metadata)
      pq.write_table(table, tmp)
    else:
      with open(tmp, 'wb') as f:
        np.savez(f, **strings, **floats, embedding=embedding, footprint=footprint,
                 metadata=np.asarray(json.dumps(dict(metadata))))
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def read_embeddings(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(columns, metadata) of a file written by :func:`write_embeddings`; the Parquet's ``geo``
  metadata is left out (``pyarrow.parquet.read_metadata`` has it). A file written before
  footprints has NaN ones."""
  if output_format(path) == 'parquet':
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    table = pq.read_table(path)
    columns = {}
    for name in COLUMNS:
      if name == 'footprint':
        rows = [wkb_ring(g) for g in table.column(GEOMETRY).to_pylist()] \
            if GEOMETRY in table.column_names else []
        columns[name] = np.stack(rows) if rows else np.full((table.num_rows, RING, 2), np.nan)
        continue
      column = table.column(name).combine_chunks()
      if name == 'embedding':
        width = column.type.list_size
        columns[name] = column.flatten().to_numpy().reshape(-1, width)
      elif name in ('tile_id', 'split', 'region'):
        columns[name] = np.asarray(column.to_pylist(), dtype=str)
      else:
        columns[name] = column.to_numpy()
    metadata = {k.decode(): json.loads(v) for k, v in (table.schema.metadata or {}).items()
                if k != b'geo'}
    return columns, metadata
  with np.load(path) as data:
    columns = {name: data[name] for name in COLUMNS if name in data}
    metadata = json.loads(str(data['metadata']))
  if 'footprint' not in columns:
    columns['footprint'] = np.full((len(columns['tile_id']), RING, 2), np.nan)
  return {name: columns[name] for name in COLUMNS}, metadata


def embed_to_file(output: str, checkpoint: str, data_dir: str, split: str = 'test', *,
                  command: str | None = None, **kwargs) -> Embeddings:
  """Checks ``output`` first, then :func:`embed_split` and :func:`write_embeddings`."""
  check_output(output)
  result = embed_split(checkpoint, data_dir, split, **kwargs)
  result.metadata['command'] = command
  write_embeddings(output, result.columns, result.metadata)
  return result


# --- Command line ---------------------------------------------------------------------------


def _define_flags():
  """The command's flags, defined only when it runs: other CLIs that tests import in the same
  process (data_pipeline.build_synthetic) define flags of the same names."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('checkpoint', None, 'Pretraining or fine-tuning workdir, its checkpoints/ '
                      'folder, or one checkpoints/<step> folder.')
  flags.DEFINE_string('data_dir', None, 'Dataset folder written by data_pipeline.')
  flags.DEFINE_string('split', 'test', 'Split to embed.')
  flags.DEFINE_list('regions', [], 'Regions to keep (default: all): ' + ','.join(schema.REGIONS))
  flags.DEFINE_enum('pool', 'cls', list(POOLS), 'cls: the cls token; mean: the mean of the '
                    'patch tokens over patches with a valid pixel.')
  flags.DEFINE_string('output', None, 'Output file, .parquet or .npz.')
  flags.DEFINE_integer('batch_size', 64, 'Global batch (rounded up to a multiple of the devices).')
  flags.DEFINE_bool('use_best', True, 'Fine-tuning checkpoints: the selected (best) weights, '
                    'when the run kept them, instead of the last.')
  flags.DEFINE_bool('progress', True, 'Progress bar on stderr (--noprogress: off).')
  flags.mark_flags_as_required(['checkpoint', 'data_dir', 'output'])


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from mae_jax import cli  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if not f['verbosity'].present:
    # TensorFlow, imported next only to read files, prints its C++ start-up lines (oneDNN
    # notice, CPU features) unless told before its import; oneDNN only changes its own math.
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  cli.start_process(argv)
  command = shlex.join(['python', '-m', 'mae_jax.tools.embed', *sys.argv[1:]])
  try:
    result = embed_to_file(f.output, f.checkpoint, f.data_dir, f.split, regions=f.regions,
                           pool=f.pool, batch_size=f.batch_size, use_best=f.use_best,
                           progress=f.progress, command=command)
  except (ValueError, FileNotFoundError) as e:
    print(f'mae_jax.tools.embed: error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)
  tiles = result.metadata['num_tiles']
  rate = tiles / result.seconds if result.seconds > 0 else float('inf')
  print(f'Embedded {tiles} tiles ({result.metadata["pool"]} pool, width '
        f'{result.metadata["width"]}) in {result.seconds:.2f} s, {rate:.1f} tiles/s '
        f'(compilation excluded) -> {f.output}', flush=True)


def console_main() -> None:
  """The ``mae-jax-embed`` command (setup.py's console script)."""
  _define_flags()
  from data_pipeline import console  # pylint: disable=g-import-not-at-top
  console.run(main, __name__)


if __name__ == '__main__':
  console_main()
