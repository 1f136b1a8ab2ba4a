r"""The Python API for notebooks: load a model once, then predict or embed numpy arrays or scenes.

  import mae_jax
  model = mae_jax.load('workdirs/worldcover')  # a fine-tuning workdir
  result = model.predict(x)                    # x: (H, W, 12) or (N, H, W, 12) dB, NaN = no-data
  result.probabilities, result.codes           # (..., H, W, 11) float32, (..., H, W) uint8
  vectors = model.embed(tiles)                 # (N, D) float32 of (N, S, S, 12) tiles

:func:`load` takes
  * a fine-tuning or linear-probing workdir, its ``checkpoints`` folder or one
    ``checkpoints/<step>`` folder (``inference.load_downstream``: the selected-best weights unless
    ``use_best=False``): ``predict`` and ``embed`` (its encoder);
  * a pretraining workdir or checkpoint: ``embed`` only;
  * an encoder export (``python -m mae_jax.tools.export --part encoder``: transformers'
    ``config.json`` with the ``mae_jax`` entry, and ``model.safetensors``): ``embed`` only.
The model's input contract (band order, clipping, normalisation statistics) comes with it and
is applied inside: inputs are plain dB values.

Inputs: arrays with the bands last, in ``Model.band_names`` order (``schema.BAND_NAMES``), sigma0
in dB (``units='linear'`` converts linear power; values that clearly contradict the stated units
are refused), floating point with NaN for no-data. No-data also follows the GeoTIFF ingestion's
rules (``scene_reader.band_to_db``: infinities, and in VV and VH exact 0 and values below the
noise floor), and every value is clipped and quantised as the model's dataset tiles were (its
contract's storage form, ``data_pipeline.quantise``: float16 dB, or uint8 codes that the model
decodes on the device), so an array and the same pixels in a GeoTIFF give the same result.
``predict`` also takes a GeoTIFF path or a list of them, read exactly as the command line reads
them (``scene_reader``: band names, units, no-data, resampling onto the model's grid).

``predict`` runs the command line's own window grid, taper blending and batching
(``predict.predict_windows``; windows of the model's tile size, ``overlap`` px shared), with the
per-pixel sums in memory instead of a scratch file, so its values are those of the COGs that
``python -m mae_jax.tools.predict`` writes for the same pixels (the map, ``--probabilities``
before uint8 quantisation, ``--confidence``). The result (:class:`Prediction`) holds, per pixel:
  * WorldCover: ``probabilities`` (..., H, W, 11) float32, the blended softmax; ``class_index``
    int16 (-1 = no-data) and ``codes`` uint8 ESA WorldCover codes (0 = no-data), the map's argmax;
    ``confidence`` float32, the largest probability;
  * VCF: ``tree_cover`` (..., H, W) float32 percent. The VCF head predicts one value per window;
    the per-pixel map blends overlapping windows. For inputs of exactly the tile size (one
    window each) ``tile_tree_cover`` (N,) is that value per tile.
Float outputs are NaN where no input band is valid. Memory holds the input, its stored copy
(float16 or uint8) and the results (about 100 bytes per pixel for WorldCover with the sums they
come from); scenes larger than memory belong to the command line, whose memory does not grow
with the scene.

``embed`` pools the encoder's tokens as ``mae_jax.tools.embed`` does (``embed_step``, pool
``'cls'`` or ``'mean'``; a tile without a valid pixel gets a NaN row), in float32 at full matmul
precision, on tiles of the model's size.

``import mae_jax`` does not import JAX; :func:`load` does (``mae_jax/__init__.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import numpy as np

from data_pipeline import quantise
from data_pipeline import schema

POOLS = ('cls', 'mean')  # As mae_jax.tools.embed.POOLS (not imported here: it imports JAX).
UNITS = ('auto', 'dB', 'linear')
EXPORT_CONFIG = 'config.json'
ONNX_FILE = 'model.onnx'  # An ONNX export's model (mae_jax.tools.export --format onnx).
# Backscatter values sampled for the units check of an array; the rule needs a median.
UNITS_SAMPLE = 100_000


@dataclasses.dataclass(frozen=True, repr=False)
class Prediction:
  """What :meth:`Model.predict` returns; arrays have the input's leading shape (N or none)."""
  task: str  # 'worldcover' or 'vcf'.
  valid: np.ndarray  # (..., H, W) bool: a valid input band under a computed window.
  # WorldCover.
  probabilities: np.ndarray | None = None  # (..., H, W, 11) float32; NaN = no-data.
  class_index: np.ndarray | None = None  # (..., H, W) int16 into class_names; -1 = no-data.
  codes: np.ndarray | None = None  # (..., H, W) uint8 ESA WorldCover codes; 0 = no-data.
  confidence: np.ndarray | None = None  # (..., H, W) float32 largest probability; NaN = no-data.
  # VCF.
  tree_cover: np.ndarray | None = None  # (..., H, W) float32 percent; NaN = no-data.
  tile_tree_cover: np.ndarray | None = None  # (N,) or (): per tile, for tile-sized inputs only.
  # A scene read from GeoTIFFs: its grid (the model's grid when it was resampled), else None.
  crs: Any = None
  transform: Any = None
  windows: int = 0  # Windows predicted.
  skipped: int = 0  # Windows without any valid pixel.
  notes: tuple[str, ...] = ()  # How a scene's units and grid were decided.

  @property
  def class_names(self) -> tuple[str, ...] | None:
    return schema.WORLDCOVER_NAMES if self.task == 'worldcover' else None

  @property
  def class_codes(self) -> tuple[int, ...] | None:
    return schema.WORLDCOVER_CODES if self.task == 'worldcover' else None

  def __repr__(self) -> str:
    arrays = ', '.join(f'{f.name}={getattr(self, f.name).dtype}{getattr(self, f.name).shape}'
                       for f in dataclasses.fields(self)
                       if isinstance(getattr(self, f.name), np.ndarray))
    return (f'Prediction(task={self.task!r}, {arrays}, windows={self.windows}, '
            f'skipped={self.skipped})')


class Model:
  """A loaded model (:func:`load`): ``predict``, ``embed`` and what its inputs must be.

  Attributes:
    path: What was loaded, as given.
    source: 'finetune' (a fine-tuning or linear-probing checkpoint), 'pretrain' or 'export'.
    task: 'worldcover', 'vcf', or 'embedding' (no head: ``embed`` only).
    contract: The input contract (``schema.InputContract``) inputs are normalised with.
    band_names: The channels, in the order the last axis of an input must have.
    tile_size: The model's window / tile side, in pixels.
    class_names, class_codes: WorldCover's classes in class-index order; None otherwise.
    checkpoint: The checkpoint step folder or export folder read.
    weights: 'best' or 'last' (fine-tuning), 'last' (pretraining), None (export).
  """

  def __init__(self, *, path: str, source: str, task: str, contract: schema.InputContract,
               tile_size: int, checkpoint: str, weights: str | None, downstream: Any = None,
               encoder: Any = None, encoder_params: Any = None, mesh: Any = None,
               rules: Any = None):
    self.path, self.source, self.task = path, source, task
    self.contract = contract
    self.band_names = tuple(contract.band_names)
    self.tile_size = int(tile_size)
    worldcover = task == 'worldcover'
    self.class_names = schema.WORLDCOVER_NAMES if worldcover else None
    self.class_codes = schema.WORLDCOVER_CODES if worldcover else None
    self.checkpoint, self.weights = checkpoint, weights
    self._downstream = downstream  # inference.Downstream, fine-tuning only.
    self._encoder, self._encoder_params = encoder, encoder_params
    self._mesh, self._rules = mesh, rules
    self._embed_fns: dict[str, Any] = {}

  def __repr__(self) -> str:
    weights = f', weights={self.weights!r}' if self.weights else ''
    return (f'Model(task={self.task!r}, source={self.source!r}, tile_size={self.tile_size}, '
            f'bands={len(self.band_names)}, checkpoint={self.checkpoint!r}{weights})')

  # --- Inputs ----------------------------------------------------------------------------------

  def _images(self, x: Any, what: str) -> tuple[np.ndarray, bool]:
    """(N, H, W, C) array of ``x`` and whether it was one (H, W, C) image; checked."""
    if isinstance(x, (np.ndarray, list, tuple)) or hasattr(x, '__array__'):
      array = np.asarray(x)
    else:
      raise ValueError(f'{what}: expected a numpy array (H, W, {len(self.band_names)}) or (N, H, '
                       f'W, {len(self.band_names)}), got {type(x).__name__}')
    channels = len(self.band_names)
    if array.dtype.kind != 'f':
      raise ValueError(f'{what}: the array has dtype {array.dtype}; expected floating-point dB '
                       '(float16, float32 or float64) with NaN for no-data: convert it with '
                       'x.astype(np.float32), setting no-data pixels to np.nan')
    if array.ndim not in (3, 4):
      raise ValueError(f'{what}: the array has shape {array.shape} ({array.ndim}-D); expected '
                       f'(H, W, {channels}) or (N, H, W, {channels}), bands last in the order '
                       f'{self.band_names}')
    if array.shape[-1] != channels:
      hint = ''
      first = array.ndim - 3  # Where the bands would be if they came first.
      if array.shape[first] == channels:
        hint = f'; the bands look first: np.moveaxis(x, {first}, -1) puts them last'
      raise ValueError(f'{what}: the array has {array.shape[-1]} bands on its last axis (shape '
                       f'{array.shape}); the model takes {channels}, in the order '
                       f'{self.band_names}{hint}')
    if 0 in array.shape:
      raise ValueError(f'{what}: the array is empty (shape {array.shape})')
    single = array.ndim == 3
    return (array[None] if single else array), single

  def _prepare(self, images: np.ndarray, units: str) -> np.ndarray:
    """Checked images -> model input as a dataset tile is stored: dB with no-data NaN, then
    encoded in the contract's storage form (clipped float16, or uint8 codes)."""
    from mae_jax.tools import scene_reader  # pylint: disable=g-import-not-at-top
    if units not in UNITS:
      raise ValueError(f'units must be one of {UNITS}, got {units!r}')
    backscatter = [scene_reader.is_backscatter(name) for name in self.band_names]
    pixels = images.reshape(-1, images.shape[-1])
    step = max(1, pixels.shape[0] * sum(backscatter) // UNITS_SAMPLE)
    sample = pixels[::step][:, backscatter].astype(np.float32)
    # Fill values out first, as for a file's units sample (exact 0 is no-data in either unit).
    sample = scene_reader.band_to_db(sample, True, 'dB')
    units, _ = scene_reader.decide_units(sample, units, 'the array', option='units',
                                         state=lambda value: f'units={value!r}', default='dB')
    storage = quantise.form_of(self.contract)
    out = np.empty(images.shape, storage.np_dtype)
    for c, is_vv_or_vh in enumerate(backscatter):
      band = scene_reader.band_to_db(images[..., c], is_vv_or_vh, units)
      # As scene_reader.SceneReader.read, one channel at a time to bound the float copies.
      out[..., c] = storage.channel(c).encode(band[..., None])[..., 0]
    return out

  # --- predict ---------------------------------------------------------------------------------

  def predict(self, x: Any, *, units: str | None = None, overlap: int | None = None,
              batch_size: int = 0, resample: bool = True, progress: bool = False) -> Prediction:
    """Per-pixel predictions of arrays or a scene (module docstring).

    Args:
      x: (H, W, C) or (N, H, W, C) floating-point array, bands last in ``band_names`` order, NaN
        = no-data; or a GeoTIFF path, or a list of paths whose bands add up to the channels.
      units: Arrays: 'dB' (default) or 'linear' (converted), refused when the VV and VH values
        clearly say otherwise; 'auto' detects. Paths: as the command line's ``--units``
        (default 'auto').
      overlap: Pixels shared by neighbouring windows; None = tile size / 8 (as the command line).
      batch_size: Windows per batch, a multiple of the data-parallel size; 0 = 8 per device.
      resample: Paths: resample a scene off the model's grid onto it (False refuses it).
      progress: A progress bar over windows on stderr.

    Returns:
      A :class:`Prediction`.

    Raises:
      ValueError: A model without a head, or an input of the wrong shape, dtype, band count or
        units (the message names what is wrong).
    """
    from mae_jax.tools import predict as predict_lib  # pylint: disable=g-import-not-at-top
    from mae_jax.tools import scene_reader  # pylint: disable=g-import-not-at-top
    if self._downstream is None:
      raise ValueError(f'{self.checkpoint} is a {self.source} model without a head: predict '
                       'needs a fine-tuning or linear-probing checkpoint (embed works on this '
                       'one)')
    loaded = self._downstream
    size, overlap, batch_size = predict_lib.check_settings(loaded, overlap, batch_size)
    channels = (1 if self.task == 'vcf' else schema.NUM_CLASSES) + 1
    if _is_paths(x):
      notes = []
      paths = [os.fspath(x)] if isinstance(x, (str, os.PathLike)) else [os.fspath(p) for p in x]
      scene = predict_lib.open_for_model(loaded, paths, units or 'auto', resample, notes.append)
      sums = np.zeros((1, scene.height, scene.width, channels), np.float32)
      total = _num_windows(scene.height, scene.width, size, overlap)
      with scene_reader.gdal_env(scene_reader.read_cache_bytes(scene, size)):
        skipped = predict_lib.predict_windows(
            loaded, predict_lib.scene_items(scene, size, overlap, _sums(sums[0]), self.contract),
            total, size, overlap, batch_size, progress)
      return self._result(sums[0], single=True, windows=total - skipped, skipped=skipped,
                          crs=scene.crs, transform=scene.transform, notes=tuple(notes))
    images, single = self._images(x, 'predict')
    images = self._prepare(images, units or 'dB')
    count, height, width = images.shape[:3]
    sums = np.zeros((count, height, width, channels), np.float32)
    total = count * _num_windows(height, width, size, overlap)
    skipped = predict_lib.predict_windows(
        loaded, _array_items(images, sums, size, overlap, quantise.form_of(self.contract)),
        total, size, overlap, batch_size, progress)
    return self._result(sums[0] if single else sums, single=single, windows=total - skipped,
                        skipped=skipped)

  def _result(self, sums: np.ndarray, *, single: bool, **fields) -> Prediction:
    """The per-pixel values of the blended sums (``map_writer``'s, as the rasters hold them)."""
    from mae_jax.tools import map_writer  # pylint: disable=g-import-not-at-top
    valid = map_writer.covered(sums)
    if self.task == 'vcf':
      cover = map_writer.tree_cover(sums)
      per_tile = None
      if cover.shape[-2:] == (self.tile_size, self.tile_size):
        # One window per image, so every valid pixel holds the head's output for the tile.
        flat_valid = valid.reshape(-1, self.tile_size ** 2)
        first = flat_valid.argmax(axis=1)
        per_tile = cover.reshape(-1, self.tile_size ** 2)[np.arange(len(first)), first]
        per_tile = np.where(flat_valid.any(axis=1), per_tile, np.nan).astype(np.float32)
        per_tile = per_tile[0] if single else per_tile
      return Prediction(task='vcf', valid=valid, tree_cover=cover, tile_tree_cover=per_tile,
                        **fields)
    index = map_writer.class_index(sums)
    probabilities = map_writer.class_probabilities(sums)
    return Prediction(task='worldcover', valid=valid, probabilities=probabilities,
                      class_index=index, codes=map_writer.worldcover_codes(index),
                      confidence=probabilities.max(axis=-1), **fields)

  # --- embed -----------------------------------------------------------------------------------

  def embed(self, x: Any, *, pool: str = 'cls', units: str | None = None,
            batch_size: int = 64) -> np.ndarray:
    """Pooled encoder embeddings of tiles, as ``mae_jax.tools.embed`` computes them.

    Args:
      x: (N, S, S, C) or (S, S, C) floating-point tiles of the model's size S (``tile_size``),
        as for :meth:`predict`.
      pool: 'cls' (the cls token) or 'mean' (patch tokens over patches with a valid pixel).
      units: As for :meth:`predict` on arrays (default 'dB').
      batch_size: Tiles per batch (rounded up to a multiple of the devices).

    Returns:
      (N, D) float32, or (D,) for one tile; NaN rows for tiles without any valid pixel.
    """
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    from mae_jax import sharding  # pylint: disable=g-import-not-at-top
    if pool not in POOLS:
      raise ValueError(f'pool must be one of {POOLS}, got {pool!r}')
    if batch_size < 1:
      raise ValueError(f'batch_size must be positive, got {batch_size}')
    images, single = self._images(x, 'embed')
    if images.shape[1:3] != (self.tile_size, self.tile_size):
      raise ValueError(f'embed: tiles must be {self.tile_size} x {self.tile_size} px (the '
                       f"model's tile size), got {images.shape[1]} x {images.shape[2]}; cut "
                       'them into tiles first (predict takes any size)')
    images = self._prepare(images, units or 'dB')
    encoder, params, mesh, rules = self._encoder_parts()
    devices = sharding.data_parallel_size(mesh)
    wanted = min(batch_size, len(images))
    batch = -(-wanted // devices) * devices
    batch_sharding = sharding.batch_sharding(mesh)
    fn = self._embed_fn(pool, encoder, batch_sharding)
    out = []
    # Full-precision float32 matmuls, as mae_jax.tools.embed: reproducible embeddings.
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules), \
        jax.default_matmul_precision('highest'):
      for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        padding = quantise.form_of(self.contract).nodata((batch - len(chunk),) + chunk.shape[1:])
        embedding, _ = fn(params, jax.device_put(np.concatenate([chunk, padding]),
                                                 batch_sharding))
        out.append(np.asarray(jax.device_get(embedding), np.float32)[:len(chunk)])
    embeddings = np.concatenate(out)
    return embeddings[0] if single else embeddings

  def _embed_fn(self, pool: str, encoder, batch_sharding):
    import jax  # pylint: disable=g-import-not-at-top
    from mae_jax.tools import embed as embed_lib  # pylint: disable=g-import-not-at-top
    if pool not in self._embed_fns:
      mean = np.asarray(self.contract.mean, np.float32)
      std = np.asarray(self.contract.std, np.float32)
      self._embed_fns[pool] = jax.jit(
          functools.partial(embed_lib.embed_step, model=encoder, mean=mean, std=std, pool=pool,
                            storage=quantise.form_of(self.contract)),
          out_shardings=batch_sharding)
    return self._embed_fns[pool]

  def _encoder_parts(self):
    """(float32 encoder, its params, mesh, rules); a fine-tuned model's encoder is taken from
    its restored params on first use (the same weights: best or last)."""
    if self._encoder is None:
      from mae_jax.models import mae  # pylint: disable=g-import-not-at-top
      from mae_jax.tools import embed as embed_lib  # pylint: disable=g-import-not-at-top
      loaded = self._downstream
      self._encoder = embed_lib.encoder_from_metadata(loaded.metadata)
      self._encoder_params = {k: v for k, v in loaded.variables['params'].items()
                              if k in mae.ENCODER_PARAMS}
      self._mesh, self._rules = loaded.mesh, loaded.rules
    return self._encoder, self._encoder_params, self._mesh, self._rules


def _is_paths(x: Any) -> bool:
  if isinstance(x, (str, os.PathLike)):
    return True
  return (isinstance(x, (list, tuple)) and bool(x)
          and all(isinstance(p, (str, os.PathLike)) for p in x))


def _num_windows(height: int, width: int, size: int, overlap: int) -> int:
  from mae_jax.tools import scene_windows  # pylint: disable=g-import-not-at-top
  rows, cols = scene_windows.grid_shape(height, width, size, overlap)
  return rows * cols


def _sums(array: np.ndarray):
  from mae_jax.tools import map_writer  # pylint: disable=g-import-not-at-top
  return map_writer.ArraySums(array)


def _array_items(images: np.ndarray, sums: np.ndarray, size: int, overlap: int,
                 storage: quantise.StorageForm):
  """``predict.predict_windows``'s items for prepared images (N, H, W, C) in ``storage``: every
  window of each image's grid, padded with no-data past its edge as the scene reader pads a
  window."""
  from mae_jax.tools import scene_windows  # pylint: disable=g-import-not-at-top
  count, height, width, channels = images.shape
  grid = list(scene_windows.grid(height, width, size, overlap))
  for i in range(count):
    target = _sums(sums[i])
    for window in grid:
      rows, cols = min(size, height - window.row), min(size, width - window.col)
      image = storage.nodata((size, size, channels))
      image[:rows, :cols] = images[i, window.row:window.row + rows, window.col:window.col + cols]
      yield window, image, target


# --- Loading -----------------------------------------------------------------------------------


def _export_config(path: str) -> dict[str, Any] | None:
  """The ``config.json`` of an export folder when it has the ``mae_jax`` entry, else None."""
  config_path = os.path.join(path, EXPORT_CONFIG)
  if not os.path.isfile(config_path):
    return None
  try:
    with open(config_path) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'{config_path} cannot be read as JSON: {e}') from e
  return config if isinstance(config, dict) and 'mae_jax' in config else None


def load(path: str | os.PathLike, *, use_best: bool = True, mesh_config: Any = None) -> Model:
  """Loads a model for :meth:`Model.predict` and :meth:`Model.embed` (module docstring).

  Args:
    path: A fine-tuning or linear-probing workdir / checkpoints folder / ``checkpoints/<step>``
      folder, a pretraining one, or an encoder export folder.
    use_best: Fine-tuning checkpoints: the weights selected on validation loss when the run
      kept them, else the last step's.
    mesh_config: Fine-tuning checkpoints: ``config.mesh``-style sizes of the mesh to restore
      onto (``inference.load_downstream``); default data-parallel over every local device.

  Returns:
    A :class:`Model`.

  Raises:
    FileNotFoundError: No such path, or no committed checkpoint there.
    ValueError: A folder that is none of the above (e.g. another transformers model).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path!r} does not exist: give a fine-tuning or pretraining '
                            'workdir, a checkpoints/<step> folder or an encoder export folder')
  if os.path.isdir(path):
    config = _export_config(path)
    if config is not None:
      return _load_export(path, config)
  from mae_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  try:
    directory, step = ckpt_lib.locate(path)
  except FileNotFoundError as e:
    if os.path.isfile(os.path.join(path, ONNX_FILE)):
      raise ValueError(f'{path} is an ONNX export (mae_jax.tools.export --format onnx): run it '
                       'with onnxruntime, or load the checkpoint it was exported from') from e
    if os.path.isfile(os.path.join(path, EXPORT_CONFIG)) and not os.path.isdir(
        os.path.join(path, 'checkpoints')):
      raise ValueError(f'{path}: its {EXPORT_CONFIG} has no "mae_jax" entry, so it is not an '
                       'export of mae_jax.tools.export (and there is no checkpoint): its input '
                       'contract (bands, normalisation) is unknown') from e
    raise
  metadata = ckpt_lib.read_metadata(directory, step)
  task = metadata.get('task')
  if task == 'finetune':
    from mae_jax.tools import inference  # pylint: disable=g-import-not-at-top
    loaded = inference.load_downstream(path, mesh_config=mesh_config, use_best=use_best)
    return Model(path=path, source='finetune', task=loaded.task, contract=loaded.contract,
                 tile_size=loaded.model.image_size, checkpoint=loaded.checkpoint,
                 weights=loaded.weights, downstream=loaded)
  if task == 'pretrain' and metadata.get('model'):
    return _load_pretrain(path, directory, step, metadata)
  raise ValueError(f'{directory}/{step} is a {task!r} checkpoint, not a mae_jax pretraining or '
                   'fine-tuning one')


def _data_parallel_mesh():
  import ml_collections  # pylint: disable=g-import-not-at-top
  from mae_jax import sharding  # pylint: disable=g-import-not-at-top
  from mae_jax.tools import inference  # pylint: disable=g-import-not-at-top
  return sharding.create_mesh(ml_collections.ConfigDict(inference.DEFAULT_MESH))


def _load_pretrain(path: str, directory: str, step: int, metadata: dict[str, Any]) -> Model:
  """The encoder of a pretraining checkpoint, restored onto a data-parallel mesh."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from mae_jax import sharding  # pylint: disable=g-import-not-at-top
  from mae_jax.tools import embed as embed_lib  # pylint: disable=g-import-not-at-top
  encoder = embed_lib.encoder_from_metadata(metadata)
  mesh = _data_parallel_mesh()
  rules = sharding.rules_from_config(metadata.get('config', {}).get('logical_rules', ()))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params = embed_lib.restore_encoder_params(directory, step, encoder, None, mesh, rules)
  return Model(path=path, source='pretrain', task='embedding',
               contract=schema.InputContract.from_dict(metadata['input_contract']),
               tile_size=encoder.image_size, checkpoint=f'{directory}/{step}', weights='last',
               encoder=encoder, encoder_params=params, mesh=mesh, rules=rules)


def _load_export(path: str, config: dict[str, Any]) -> Model:
  """An encoder export: the encoder rebuilt from its weights and config (as
  ``pretrained.import_weights`` reads them), the input contract from its ``mae_jax`` entry."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from configs import pretrain as pretrain_configs  # pylint: disable=g-import-not-at-top
  from mae_jax import pretrained  # pylint: disable=g-import-not-at-top
  from mae_jax import sharding  # pylint: disable=g-import-not-at-top
  from mae_jax.models import hf_convert  # pylint: disable=g-import-not-at-top
  from mae_jax.models import mae  # pylint: disable=g-import-not-at-top
  from mae_jax.tools import embed as embed_lib  # pylint: disable=g-import-not-at-top
  provenance = config['mae_jax']
  if not provenance.get('input_contract'):
    raise ValueError(f'{path}/{EXPORT_CONFIG}: the "mae_jax" entry has no input_contract')
  contract = schema.InputContract.from_dict(provenance['input_contract'])
  state, _ = pretrained.read_state_dict(path)
  state = {k: v for k, v in state.items() if k.startswith(hf_convert.ENCODER_PREFIX)}
  fields, _ = pretrained.describe_source(state, config, mae.MaskedAutoencoder())
  fields.update(dtype=jnp.float32, scan_layers=False, attention_implementation='auto',
                layer_norm_eps=float(config.get('layer_norm_eps', 1e-6)))
  full = mae.MaskedAutoencoder(**{**mae.module_fields(mae.MaskedAutoencoder()), **fields})
  if full.num_channels != contract.num_channels:
    raise ValueError(f'{path}: the encoder takes {full.num_channels} channels but its input '
                     f'contract names {contract.num_channels} bands')
  params = hf_convert.from_hf_state_dict(full, state, part='encoder')
  encoder = embed_lib.Encoder(**mae.module_fields(full))
  mesh = _data_parallel_mesh()
  rules = sharding.rules_from_config(pretrain_configs.DEFAULT_LOGICAL_RULES)
  params = jax.device_put(params, sharding.replicated(mesh))
  return Model(path=path, source='export', task='embedding', contract=contract,
               tile_size=encoder.image_size, checkpoint=os.path.abspath(path), weights=None,
               encoder=encoder, encoder_params=params, mesh=mesh, rules=rules)
