r"""Whole-scene prediction: a fine-tuned model applied in overlapping windows, written as a COG.

  python -m mae_jax.tools.predict --checkpoint PATH --input scene.tif [more.tif ...] \
      --output map.tif [--probabilities probs.tif] [--confidence conf.tif] [--overlap PX] \
      [--batch_size N] [--nouse_best] [--units auto|dB|linear] [--noresample] [--noprogress]

``PATH`` is a fine-tuning or linear-probing workdir (its latest step) or one ``checkpoints/<step>``
folder; the model, head, task and input contract come from its metadata
(``mae_jax.tools.inference``). The parts, one job each:
  * ``mae_jax.tools.scene_reader``: which GeoTIFFs make a scene (bands, order, units, no-data)
    and reading them in windows exactly as the dataset's tiles were made; a scene whose pixel
    size or CRS is not the model's is resampled onto the model's grid, and the map written on
    that grid (``mae_jax.tools.scene_grid``), unless ``--noresample`` refuses it;
  * ``mae_jax.tools.scene_windows``: the window grid (``overlap`` px between neighbours, default
    size / 8) and the taper that blends overlapping windows;
  * this module: batches of windows with any valid pixel, jitted and sharded over every device
    (:func:`predict_windows`, which the Python API ``mae_jax.tools.api`` shares for arrays);
  * ``mae_jax.tools.map_writer``: per-pixel sums on disk, then the map (VCF percent tree cover or
    WorldCover codes) as a Cloud Optimized GeoTIFF on the scene's grid (the model's grid when
    the scene was resampled); for WorldCover optionally the blended class probabilities
    (``--probabilities``, 11 bands) and their maximum (``--confidence``), uint8 scaled by 254
    (see map_writer), whose argmax is the map's class. A VCF model refuses both flags.
Pixels without any valid input band are no-data in every output. Memory does not grow with the
scene. Everything is written under temporary names in each output's folder and renamed at the
end: on any error no partial output and no scratch file is left.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import glob
import itertools
import math
import os
import sys
import time
import uuid
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np

from data_pipeline import quantise
from data_pipeline import schema
from mae_jax.tools import map_writer
from mae_jax.tools import scene_reader
from mae_jax.tools import scene_windows
from mae_jax.tools.scene_reader import Scene

# Windows per device and batch when --batch_size is 0.
WINDOWS_PER_DEVICE = 8

# --- Model -----------------------------------------------------------------------------------

_PREDICT_FNS: dict[Any, Callable] = {}


def window_form(loaded) -> quantise.StorageForm:
  """How windows are handed to the model: the storage form of its contract, i.e. of the data it
  was fine-tuned on, so a window is quantised exactly as its training tiles were."""
  return quantise.form_of(loaded.contract)


def predict_fn(loaded) -> Callable:
  """Jitted (variables, stored windows (B, S, S, C), tapers (B, S, S)) -> (B, S, S, k + 1):
  the window's output times its weight, then the weight, where the weight is the taper at
  pixels with a valid band and 0 elsewhere. The output is the per-window percent tree cover
  (k = 1) or the softmax probabilities (k = classes). Windows come in the storage form of the
  model's contract (:func:`window_form`) and are decoded on the device. One per model, so
  repeated scenes reuse the compiled program."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mae_jax import preprocess  # pylint: disable=g-import-not-at-top
  mean = tuple(loaded.contract.mean)
  std = tuple(loaded.contract.std)
  storage = window_form(loaded)
  key = (loaded.model, loaded.task, mean, std, storage)
  if key not in _PREDICT_FNS:
    model, task = loaded.model, loaded.task
    mean_array, std_array = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def predict(variables, images, tapers):
      normalised, valid = preprocess.normalise(images, mean_array, std_array, storage)
      out = model.apply(variables, normalised)
      # A pixel without any valid band keeps weight 0 in every window: no-data in the map.
      weight = tapers * valid.any(axis=-1)
      if task == 'worldcover':
        # Probabilities, not logits, are what blends: a confident window should not outvote a
        # neighbour by the scale of its logits.
        weighted = jax.nn.softmax(out, axis=-1) * weight[..., None]
      else:
        weighted = (out[:, None, None] * weight)[..., None]
      return jnp.concatenate([weighted, weight[..., None]], axis=-1)

    _PREDICT_FNS[key] = jax.jit(predict)
  return _PREDICT_FNS[key]


# --- Prediction ------------------------------------------------------------------------------


class Sums(Protocol):
  """Where a window's weighted outputs go: ``map_writer.Accumulator`` (on disk) or
  ``map_writer.ArraySums`` (in memory), one per image; its height and width are the image's."""
  height: int
  width: int

  def add(self, row: int, col: int, values: np.ndarray) -> None:
    ...


def check_settings(loaded, overlap: int | None, batch_size: int) -> tuple[int, int, int]:
  """(window size, overlap, batch size) for ``loaded``: defaults filled in and checked.

  Raises:
    RuntimeError: More than one process.
    ValueError: An overlap of half the window or more, or a batch size that is not a positive
      multiple of the data-parallel size.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from mae_jax import sharding  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    raise RuntimeError(f'whole-scene prediction runs in one process; this is one of '
                       f'{jax.process_count()} (start it without a multi-process launcher)')
  size = loaded.model.image_size
  overlap = scene_windows.default_overlap(size) if overlap is None else int(overlap)
  scene_windows.check_overlap(size, overlap)
  parallel = sharding.data_parallel_size(loaded.mesh)
  batch_size = batch_size or WINDOWS_PER_DEVICE * parallel
  if batch_size <= 0 or batch_size % parallel:
    raise ValueError(f'batch size {batch_size} must be a positive multiple of the '
                     f'data-parallel size {parallel} (mesh {dict(loaded.mesh.shape)})')
  return size, overlap, batch_size


def predict_windows(loaded, items: Iterable[tuple[scene_windows.Window, np.ndarray, Sums]],
                    total: int, size: int, overlap: int, batch_size: int,
                    progress: bool) -> int:
  """Predicts every window with data and adds its weighted output into its sums; returns the
  number of windows skipped for having no valid pixel.

  Args:
    loaded: An ``inference.Downstream``.
    items: (window, image, sums) in grid order for each image: the window of
      ``scene_windows.grid(sums.height, sums.width, size, overlap)``, its (size, size, C) input
      stored as a dataset tile of the model's (:func:`window_form`: clipped float16 with NaN =
      no-data, or uint8 codes with 0 = no-data; past the image's edge no-data) and the
      :class:`Sums` of the image it belongs to. Windows of several images may
      follow one another (batches then mix images). Closed at the end when it has ``close``.
    total: The number of items (for the progress bar).
    size, overlap, batch_size: From :func:`check_settings`.
    progress: Show a progress bar over windows (stderr).

  Three stages run at once: the caller's iterator (threads reading a scene ahead, or slices of
  an array), this thread batching and dispatching windows to the devices (asynchronously), and a
  writer thread that waits for each batch's outputs and adds them to the sums, in item order (so
  the float sums do not depend on thread timing). At most two batches are in flight.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import tqdm  # pylint: disable=g-import-not-at-top
  from mae_jax import sharding  # pylint: disable=g-import-not-at-top

  mesh = loaded.mesh
  batch_sharding = sharding.batch_sharding(mesh)
  fn = predict_fn(loaded)
  storage = window_form(loaded)
  tapers: dict[tuple[Any, ...], np.ndarray] = {}
  skipped = 0

  def taper(window, sums):
    shape = scene_windows.grid_shape(sums.height, sums.width, size, overlap)
    key = (shape, window.index_row > 0, window.index_row < shape[0] - 1,
           window.index_col > 0, window.index_col < shape[1] - 1)
    if key not in tapers:
      tapers[key] = scene_windows.taper(size, overlap, window, shape)
    return tapers[key]

  def dispatch(batch):
    padding = batch_size - len(batch)  # The last batch: no-data windows of weight 0.
    images = np.stack([image for _, image, _ in batch]
                      + [storage.nodata(batch[0][1].shape)] * padding)
    weights = np.stack([taper(w, sums) for w, _, sums in batch]
                       + [np.zeros((size, size), np.float32)] * padding)
    with jax.set_mesh(mesh), nn.logical_axis_rules(loaded.rules):
      outputs = fn(loaded.variables, jax.device_put(images, batch_sharding),
                   jax.device_put(weights, batch_sharding))
    return [(w, sums) for w, _, sums in batch], outputs

  def accumulate(targets, outputs):
    outputs = np.asarray(jax.device_get(outputs))  # Waits for the devices.
    for (window, sums), values in zip(targets, outputs):
      rows = min(size, sums.height - window.row)
      cols = min(size, sums.width - window.col)
      sums.add(window.row, window.col, values[:rows, :cols])
    return len(targets)

  writer = scene_reader.thread_pool('write', 1)
  pending = collections.deque()
  closing = contextlib.closing(items) if hasattr(items, 'close') else contextlib.nullcontext()
  with tqdm.tqdm(total=total, unit='window', file=sys.stderr, disable=not progress,
                 dynamic_ncols=True) as bar, closing:
    try:
      batch = []
      for window, image, sums in itertools.chain(items, [(None, None, None)]):
        if window is not None:
          if not storage.valid(image).any():
            skipped += 1
            bar.update(1)
            continue
          batch.append((window, image, sums))
        if batch and (len(batch) == batch_size or window is None):
          pending.append(writer.submit(accumulate, *dispatch(batch)))
          batch = []
          while len(pending) > 1:
            bar.update(pending.popleft().result())
      while pending:
        bar.update(pending.popleft().result())
    finally:
      # On an error, let the writer finish before the caller closes and deletes the sums.
      for future in pending:
        future.cancel()
      concurrent.futures.wait(pending)
  return skipped


def scene_items(scene: Scene, size: int, overlap: int, sums: Sums, contract: schema.InputContract
                ) -> Iterator[tuple[scene_windows.Window, np.ndarray, Sums]]:
  """:func:`predict_windows`'s items for an opened scene: every window, read ahead by threads
  (``scene_reader.read_windows``); closing this generator stops the readers."""
  reads = scene_reader.read_windows(scene, scene_windows.grid(scene.height, scene.width, size,
                                                              overlap),
                                    size, quantise.form_of(contract))
  with contextlib.closing(reads):
    for window, image in reads:
      yield window, image, sums


def open_for_model(loaded, scene: Scene | Sequence[str], units: str = 'auto',
                   resample: bool = True, log: Callable[[str], None] = print) -> Scene:
  """The scene (opened, or its paths) for ``loaded``'s input contract
  (``scene_reader.for_model``: bands, units, grid), its decisions logged one line each."""
  with scene_reader.gdal_env(scene_reader.OPEN_GDAL_CACHE):
    scene = scene_reader.for_model(loaded.contract, scene, units, resample)
  for line in scene.decisions:  # Units and grid, one line each.
    log(line)
  size = loaded.model.image_size
  if scene.striped and scene.width > 4 * size:
    log(f'{", ".join(scene.striped)}: stored in strips, not tiles: every window decodes '
        'whole-width rows (slow for wide scenes); a tiled GeoTIFF or COG reads faster')
  return scene


def check_outputs(output: str, probabilities: str | None = None, confidence: str | None = None,
                  task: str | None = None) -> dict[str, str]:
  """{'map': output, 'probabilities': ..., 'confidence': ...} (those given), after checking that
  each can be written (``map_writer.check_output``), that they are different files, and that
  ``task`` (when known) has classes for the probability and confidence rasters.

  Raises:
    ValueError: Probability or confidence rasters for a VCF model; one path given twice.
    OSError: A missing or unwritable output folder, an output that is a folder.
  """
  paths = {'map': output, 'probabilities': probabilities, 'confidence': confidence}
  paths = {key: path for key, path in paths.items() if path or key == 'map'}
  extras = [f'--{key}' for key in paths if key != 'map']
  if task == 'vcf' and extras:
    raise ValueError(f'{" and ".join(extras)}: class probability and confidence rasters are '
                     'WorldCover outputs, and this is a VCF model (percent tree cover, no '
                     'classes); drop them')
  for path in paths.values():
    map_writer.check_output(path)
  seen = {}
  for key, path in paths.items():
    where = os.path.abspath(path)
    if where in seen:
      raise ValueError(f'--{seen[where]} and --{key} name the same file {path!r}; give each '
                       'output its own path')
    seen[where] = 'output' if key == 'map' else key
  return paths


def _temporary_prefix(path: str) -> str:
  """A unique hidden name beside ``path``: its temporaries are renamed into place, within one
  file system, at the end."""
  folder, name = os.path.split(os.path.abspath(path))
  return os.path.join(folder, f'.{name}.{os.getpid()}.{uuid.uuid4().hex[:12]}')


def predict_scene(loaded, scene: Scene | Sequence[str], output: str, *,
                  probabilities: str | None = None, confidence: str | None = None,
                  overlap: int | None = None, batch_size: int = 0, units: str = 'auto',
                  resample: bool = True, progress: bool = True,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
  """Predicts a map of ``scene`` with a model from ``inference.load_downstream``.

  Args:
    loaded: An ``inference.Downstream``.
    scene: A :class:`Scene` (``open_scene``) or the input paths.
    output: The map's path (GeoTIFF, COG layout); its folder must exist. Replaced atomically.
    probabilities: WorldCover only: also write the blended class probabilities here (11-band
      uint8 COG, ``map_writer``); replaced atomically.
    confidence: WorldCover only: also write the largest class probability here (1-band uint8
      COG); replaced atomically.
    overlap: Pixels shared by neighbouring windows; None = window size / 8. Must be below half
      the window size.
    batch_size: Windows per global batch, a multiple of the data-parallel size; 0 =
      WINDOWS_PER_DEVICE per data-parallel device.
    units: Used when ``scene`` is paths: 'auto', 'dB' or 'linear'.
    resample: Resample a scene whose pixel size or CRS is not the model's onto the model's grid
      (the map is then on that grid); False refuses it (``scene_reader.on_grid``).
    progress: Show a progress bar over windows (stderr).
    log: Where the summary lines go.

  Returns:
    Counts and timings: windows, skipped (no valid pixel), seconds, windows_per_s, ...
  """
  start = time.perf_counter()
  size, overlap, batch_size = check_settings(loaded, overlap, batch_size)
  paths = check_outputs(output, probabilities, confidence, loaded.task)
  scene = open_for_model(loaded, scene, units, resample, log)
  with scene_reader.gdal_env(scene_reader.read_cache_bytes(scene, size)):
    num_windows = math.prod(scene_windows.grid_shape(scene.height, scene.width, size, overlap))
    # Weighted outputs, then the weight.
    channels = (1 if loaded.task == 'vcf' else schema.NUM_CLASSES) + 1
    prefixes = {key: _temporary_prefix(path) for key, path in paths.items()}
    pairs = {key: (prefix + '.tiled.tif', prefix + '.cog.tif')
             for key, prefix in prefixes.items()}
    accumulator = None
    try:
      accumulator = map_writer.Accumulator(prefixes['map'] + '.sums', scene.height, scene.width,
                                           channels)
      skipped = predict_windows(loaded, scene_items(scene, size, overlap, accumulator,
                                                    loaded.contract),
                                num_windows, size, overlap, batch_size, progress)
      predicted = time.perf_counter()
      counts = {'windows': num_windows - skipped, 'skipped': skipped}
      tags = {'MAE_JAX_TASK': loaded.task, 'MAE_JAX_CHECKPOINT': loaded.checkpoint,
              'MAE_JAX_WEIGHTS': loaded.weights, 'MAE_JAX_INPUTS': ' '.join(scene.paths),
              'MAE_JAX_WINDOW': f'{size} px, overlap {overlap} px',
              'MAE_JAX_INPUT_DECISIONS': '; '.join(scene.decisions)}
      map_writer.write_map(accumulator, loaded.task, *pairs['map'], scene, tags,
                           probabilities=pairs.get('probabilities'),
                           confidence=pairs.get('confidence'))
      # Every output is complete before any is renamed.
      for key, path in paths.items():
        os.replace(pairs[key][1], path)
    finally:
      if accumulator is not None:
        accumulator.close()
      # Scratch sums, the tiled rasters, the COGs (unless renamed) and anything GDAL made
      # beside them (e.g. its temporary overview file).
      for prefix in prefixes.values():
        for leftover in glob.glob(glob.escape(prefix) + '*'):
          os.remove(leftover)
  end = time.perf_counter()
  seconds = end - start
  stats = dict(counts, seconds=seconds, predict_seconds=predicted - start,
               write_seconds=end - predicted, windows_per_s=counts['windows'] / seconds,
               pixels_per_s=scene.height * scene.width / seconds, height=scene.height,
               width=scene.width, window_size=size, overlap=overlap, batch_size=batch_size)
  log(f'{counts["windows"]} windows of {size} px (overlap {overlap} px; {counts["skipped"]} '
      f'without data skipped) over {scene.width} x {scene.height} px in {seconds:.1f} s: '
      f'{stats["windows_per_s"]:.2f} windows/s, {stats["pixels_per_s"] / 1e6:.2f} Mpx/s; '
      f'wrote {", ".join(paths.values())}')
  return stats


def run(checkpoint: str, inputs: Sequence[str], output: str, *,
        probabilities: str | None = None, confidence: str | None = None,
        overlap: int | None = None, batch_size: int = 0, use_best: bool = True,
        units: str = 'auto', resample: bool = True, progress: bool = True,
        mesh_config: Any = None) -> dict[str, Any]:
  """The command: checks the outputs and the inputs first (cheap: the checkpoint's task, and the
  grid against its input contract, read from its metadata), then loads the checkpoint
  (``inference.load_downstream``) and predicts."""
  from mae_jax.tools import inference  # pylint: disable=g-import-not-at-top
  check_outputs(output, probabilities, confidence)
  metadata = inference.read_finetune_metadata(checkpoint)[2]
  task = metadata.get('task_name') or metadata.get('config', {}).get('task_name')
  check_outputs(output, probabilities, confidence, task)  # Refuses the rasters for VCF.
  with scene_reader.gdal_env(scene_reader.OPEN_GDAL_CACHE):
    scene = scene_reader.open_scene(inputs, schema.BAND_NAMES, units)
  contract = schema.InputContract.from_dict(metadata['input_contract'])
  scene = scene_reader.on_grid(scene, contract.pixel_size_m, resample)
  loaded = inference.load_downstream(checkpoint, mesh_config=mesh_config, use_best=use_best)
  print(f'{loaded.checkpoint} ({loaded.task}, {loaded.weights} weights): {len(scene.paths)} '
        f'input file(s), {scene.width} x {scene.height} px', flush=True)
  return predict_scene(loaded, scene, output, probabilities=probabilities,
                       confidence=confidence, overlap=overlap, batch_size=batch_size,
                       resample=resample, progress=progress)


# --- Command line ----------------------------------------------------------------------------

def _define_flags():
  """The command's flags, defined only when it runs: other CLIs that tests import into the same
  process (data_pipeline.build_synthetic) define flags of the same names."""
  flags.DEFINE_string('checkpoint', None, 'Fine-tuning workdir or one of its checkpoints/<step> '
                      'folders.')
  flags.DEFINE_multi_string('input', None, 'Input GeoTIFF(s); more may follow as plain '
                            'arguments (--input a.tif b.tif c.tif).')
  flags.DEFINE_string('output', None, 'Output map (Cloud Optimized GeoTIFF).')
  flags.DEFINE_string('probabilities', None, 'WorldCover models: also write the blended class '
                      'probabilities here (11-band uint8 COG, p = value / 254, 255 = no-data; '
                      'bands named by class). Refused for VCF models.')
  flags.DEFINE_string('confidence', None, 'WorldCover models: also write the largest class '
                      'probability here (1-band uint8 COG, same scale). Refused for VCF models.')
  flags.DEFINE_integer('overlap', None, 'Pixels shared by neighbouring windows (default: window '
                       'size / 8; below half the window size).')
  flags.DEFINE_integer('batch_size', 0, 'Windows per batch over all devices, a multiple of the '
                       f'device count; 0 = {WINDOWS_PER_DEVICE} per device.')
  flags.DEFINE_bool('use_best', True, 'Use the step selected on validation loss (--nouse_best: '
                    'the last step).')
  flags.DEFINE_enum('units', 'auto', scene_reader.UNITS, 'Units of the input values; auto '
                    'detects dB or linear power from the VV and VH bands; stated units that the '
                    'values clearly contradict are refused.')
  flags.DEFINE_bool('resample', True, 'Resample a scene whose pixel size or CRS is not the '
                    "model's (e.g. 20 m, or EPSG:4326) onto the model's grid (bilinear in linear "
                    'power); the map is on that grid (--noresample: refuse such a scene).')
  flags.DEFINE_bool('progress', True, 'Progress bar over windows on stderr (--noprogress: off).')
  flags.mark_flags_as_required(['checkpoint', 'input', 'output'])


def input_paths(flagged: Sequence[str] | None, positional: Sequence[str]) -> list[str]:
  """--input values followed by the plain arguments (absl leaves those in argv)."""
  flagged = list(flagged or [])
  if positional and len(flagged) > 1:
    # absl returns the two lists separately, so their interleaving (the band order) is lost.
    raise app.UsageError('give the inputs either as repeated --input flags or as one --input '
                         f'followed by the file names, not both (got --input {flagged} and '
                         f'{list(positional)})')
  return flagged + list(positional)


def main(argv):
  f = flags.FLAGS
  if not f['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO.
  inputs = input_paths(f.input, argv[1:])
  try:
    run(f.checkpoint, inputs, f.output, probabilities=f.probabilities,
        confidence=f.confidence, overlap=f.overlap, batch_size=f.batch_size,
        use_best=f.use_best, units=f.units, resample=f.resample, progress=f.progress)
  except (ValueError, OSError) as e:  # Bad inputs, paths or checkpoints: the message says it.
    print(f'mae_jax.tools.predict: error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)


def console_main() -> None:
  """The ``mae-jax-predict`` command (setup.py's console script)."""
  _define_flags()
  from data_pipeline import console  # pylint: disable=g-import-not-at-top
  console.run(main, __name__)


if __name__ == '__main__':
  console_main()
