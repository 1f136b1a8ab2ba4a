"""The lean install: training, evaluation and the tools run where TensorFlow is not installed.

TensorFlow, TFDS and CLU are hidden from subprocesses (``tests/test_bench.py``'s import hook), as
on a machine with ``pip install mae_jax`` and no ``[data]`` extra; the dataset they read was
built here, with TensorFlow. Also: the TF-free metadata reader cuts splits as TFDS does, the
record CRCs are checked without TensorFlow, and setup.py's ranges hold the versions pinned in
requirements*.txt (what make and CI install and test).
"""

import ast
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline import dataset_info
from data_pipeline import example_codec
from data_pipeline import schema
from data_pipeline import tfrecord_index
from test_bench import HIDE_TENSORFLOW
from tiny_config import make_tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(name='hidden_env', scope='module')
def fixture_hidden_env(tmp_path_factory):
  """Environment of a subprocess that cannot import TensorFlow, TFDS or CLU (one CPU device)."""
  folder = tmp_path_factory.mktemp('hide_tensorflow')
  (folder / 'sitecustomize.py').write_text(HIDE_TENSORFLOW)
  env = dict(os.environ, PYTHONPATH=str(folder), XLA_FLAGS='', JAX_PLATFORMS='cpu')
  check = subprocess.run([sys.executable, '-c', 'import tensorflow_datasets'], env=env,
                         capture_output=True, text=True, check=False)
  assert "No module named 'tensorflow_datasets'" in check.stderr
  return env


def run(env, *args, timeout=300):
  """Runs ``python *args`` in the repository; fails the test with its output if it fails."""
  result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=False, timeout=timeout)
  assert result.returncode == 0, f'{args}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}'
  return result


def events(logdir):
  """{'scalars': {tag: [(step, value)]}, 'images': {tag: [step]}} of a TensorBoard folder."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  reader = event_accumulator.EventAccumulator(str(logdir), size_guidance={'images': 0})
  reader.Reload()
  tags = reader.Tags()
  return {'scalars': {t: [(e.step, e.value) for e in reader.Scalars(t)] for t in tags['scalars']},
          'images': {t: [e.step for e in reader.Images(t)] for t in tags['images']}}


def model_flags(data_dir):
  """--config.model.* flags giving the tiny test model (tests/tiny_config.py)."""
  model = make_tiny_config(data_dir).model
  flags = [f'--config.model.image_size={model.image_size}']
  for part in ('encoder', 'decoder'):
    flags += [f'--config.model.{part}.{key}={value}' for key, value in model[part].items()]
  return flags


def scene(path):
  """A 12-band dB GeoTIFF of 48 x 40 px on a 10 m UTM grid."""
  import rasterio  # pylint: disable=g-import-not-at-top
  from rasterio.transform import from_origin  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  vv = rng.uniform(-14.0, -6.0, (4, 40, 48))
  vh = vv - 6.0 + rng.normal(0.0, 1.0, vv.shape)
  bands = np.concatenate([vv - vh, vv, vh]).astype(np.float32)
  with rasterio.open(path, 'w', driver='GTiff', width=48, height=40, count=12, dtype='float32',
                     crs='EPSG:32633', transform=from_origin(500_000.0, 5_300_000.0, 10.0, 10.0)
                     ) as out:
    out.write(bands)
  return str(path)


@pytest.mark.integration
def test_train_evaluate_and_tools_run_without_tensorflow(hidden_env, tiny_dataset, tmp_path):
  pre, fine = tmp_path / 'pretrain', tmp_path / 'finetune'
  run(hidden_env, '-m', 'mae_jax.main', '--config', f'tests/tiny_config.py:{tiny_dataset}',
      '--workdir', str(pre), '--config.total_steps=2', '--config.image_every_steps=2')
  run(hidden_env, '-m', 'mae_jax.main', '--config', 'configs/finetune_vcf.py:tiny',
      '--workdir', str(fine), f'--config.init_checkpoint={pre}',
      f'--config.dataset.data_dir={tiny_dataset}', *model_flags(tiny_dataset),
      '--config.head.options.hidden=(16, 8)', '--config.total_steps=2',
      '--config.eval_every_steps=2', '--config.log_every_steps=1',
      '--config.dataset.shuffle_buffer=16', '--config.checkpoint.async_save=False')
  run(hidden_env, '-m', 'mae_jax.main', '--config', 'configs/evaluate.py',
      f'--config.checkpoint={fine}', '--config.splits=("test",)', '--config.num_images=1')
  run(hidden_env, '-m', 'mae_jax.tools.export', f'--checkpoint={pre}',
      f'--output={tmp_path / "export"}')
  run(hidden_env, '-m', 'mae_jax.tools.embed', f'--checkpoint={pre}',
      f'--data_dir={tiny_dataset}', '--split=test', f'--output={tmp_path / "test.parquet"}',
      '--noprogress')
  run(hidden_env, '-m', 'mae_jax.tools.predict', f'--checkpoint={fine}',
      f'--input={scene(tmp_path / "scene.tif")}', f'--output={tmp_path / "vcf.tif"}',
      '--noprogress')

  # TensorBoard reads what the runs wrote: scalars of every logged step, the reconstruction.
  logged = events(pre / 'tensorboard')
  assert [step for step, _ in logged['scalars']['loss']] == [1, 2]
  assert logged['images'] == {'reconstruction': [2]}
  rows = [json.loads(line) for line in (pre / 'metrics.jsonl').read_text().splitlines()]
  assert [value for _, value in logged['scalars']['loss']] == pytest.approx(
      [row['loss'] for row in rows], rel=1e-6)
  assert [step for step, _ in events(fine / 'tensorboard')['scalars']['loss']] == [1, 2]
  assert os.listdir(fine / 'eval')  # evaluate's metrics
  assert {'model.safetensors', 'config.json'} <= set(os.listdir(tmp_path / 'export'))
  assert (tmp_path / 'test.parquet').stat().st_size > 0
  assert (tmp_path / 'vcf.tif').stat().st_size > 0


@pytest.mark.integration
def test_checksums_are_verified_and_urls_need_the_data_extra(hidden_env, tiny_dataset, tmp_path):
  data = tmp_path / 'data'
  shutil.copytree(tiny_dataset, data)
  path = dataset_info.read(str(data)).splits['train'].paths[1]
  offset, length = tfrecord_index.scan_tfrecord(path)[5]
  with open(path, 'r+b') as f:  # One bit in the middle of record 5: only its CRC tells.
    f.seek(int(offset + length // 2))
    value = f.read(1)[0]
    f.seek(int(offset + length // 2))
    f.write(bytes([value ^ 1]))
  script = f'''
import sys
from data_pipeline import dataset_info, input as data_input
dataset = data_input.HostDataset({str(data)!r}, 'train', 0, 1, verify_checksums=True)
try:
  for _ in dataset.eval_batches(8):
    pass
except data_input.BadRecordError as e:
  print('BAD', e)
try:
  dataset_info.read('gs://bucket/dataset')
except ImportError as e:
  print('URL', e)
assert 'tensorflow' not in sys.modules
'''
  out = run(hidden_env, '-c', script).stdout
  assert (f'BAD {path}: record 5 (split record 13, byte {offset - 12}): corrupt record: its '
          'bytes do not match their CRC (masked CRC32C stored') in out
  assert "URL gs://bucket/dataset: a dataset at a URL is read through tf.io.gfile, which needs " \
         "TensorFlow: pip install 'mae_jax[data]'" in out


def test_console_commands_show_their_flags(hidden_env):
  own_flag = {'train': 'workdir', 'study': 'quick', 'predict': 'overlap', 'embed': 'pool',
              'export': 'part', 'build-dataset': 'overwrite', 'inspect-dataset': 'num_tiles',
              'synthetic-dataset': 'tile_size'}
  for name, flag in own_flag.items():
    command = os.path.join(os.path.dirname(sys.executable), f'mae-jax-{name}')
    if not os.path.exists(command):
      pytest.skip(f'{command} is not installed (pip install -e .)')
    # absl's --help exits with 1.
    result = subprocess.run([command, '--help'], cwd=ROOT, env=hidden_env, capture_output=True,
                            text=True, check=False, timeout=120)
    assert re.search(rf'\n  --(\[no\])?{flag}:', result.stdout), (
        name, result.stdout[-2000:], result.stderr[-2000:])


@pytest.mark.parametrize('count', [1, 3, 8])
def test_shares_and_files_match_tfds(tiny_dataset, count):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder_from_directory(tiny_dataset)
  info = dataset_info.read(tiny_dataset)
  assert info.metadata == dict(builder.info.metadata)
  for name, split in info.splits.items():
    assert split.num_shards == builder.info.splits[name].num_shards
    for index, share in enumerate(tfds.even_splits(name, n=count, drop_remainder=True)):
      expected = builder.info.splits[share]
      start, stop = split.share(index, count)
      assert stop - start == expected.num_examples
      assert split.file_instructions(start, stop) == [
          (os.fspath(f.filename), f.skip, f.take, f.examples_in_shard)
          for f in expected.file_instructions]
  for name, feature in builder.info.features.items():
    codec = example_codec.codec_for(name, info.features[name])
    assert codec == example_codec.codec_for(name, feature), name
  assert info.features[schema.IMAGE].shape == (32, 32, 12)


def _assigned(tree, name):
  """The literal value setup.py assigns to ``name``."""
  return next(ast.literal_eval(node.value) for node in tree.body
              if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
              and node.targets[0].id == name)


def test_setup_ranges_hold_the_pinned_versions_and_commands_exist():
  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  with open(os.path.join(ROOT, 'setup.py')) as f:
    tree = ast.parse(f.read())
  pins = {}  # What make and CI install (torch: requirements-parity.txt alone).
  for name in ('requirements.txt', 'requirements-parity.txt', 'requirements-lock.txt'):
    with open(os.path.join(ROOT, name)) as f:
      for line in f:
        if '==' in line and not line.startswith('#'):
          package, version = line.strip().split('==')
          pins.setdefault(package.lower().replace('_', '-'), set()).add(version)
  requirements = [Requirement(r) for r in _assigned(tree, 'INSTALL_REQUIRES')]
  for extra in _assigned(tree, 'EXTRAS_REQUIRE').values():
    requirements += [Requirement(r) for r in extra]
  checked = 0
  for requirement in requirements:
    if requirement.marker and not requirement.marker.evaluate():
      continue
    name = requirement.name.lower().replace('_', '-')
    assert len(pins.get(name, ())) == 1, f'{name}: pinned {pins.get(name)} in requirements*.txt'
    assert requirement.specifier.contains(*pins[name]), (str(requirement), pins[name])
    checked += 1
  assert checked >= 20
  assert not {'tensorflow-cpu', 'tensorflow', 'tensorflow-datasets', 'torch', 'clu', 'pytest'} & {
      Requirement(r).name for r in _assigned(tree, 'INSTALL_REQUIRES')}
  for script in _assigned(tree, 'CONSOLE_SCRIPTS'):
    module, function = script.split('=')[1].strip().split(':')
    with open(os.path.join(ROOT, *module.split('.')) + '.py') as f:
      functions = {node.name for node in ast.parse(f.read()).body
                   if isinstance(node, ast.FunctionDef)}
    assert function in functions, script
