"""--overwrite replaces only the program's own output, and only once the new one is complete.

The export (mae_jax.tools.export) and the dataset builds (data_pipeline.writer, used by
data_pipeline.ingest.build and data_pipeline.build_synthetic): a workdir or a folder with other
files is refused untouched, a failure leaves the old output and no temporary folder, messages
name the --overwrite flag, and exported files get the umask's mode like config.json.
"""

import functools
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import rasterio
import tensorflow_datasets as tfds

import configs.data.m3leo as m3leo_config
from data_pipeline import build_synthetic
from data_pipeline import replace
from data_pipeline import schema
from data_pipeline import writer
from data_pipeline.ingest import build
from data_pipeline.ingest import m3leo
from tests.test_m3leo import CHIPS
from tests.test_m3leo import SIZE
from tests.test_m3leo import _build_area

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNITS = {'train': list(range(4)), 'test': list(range(4, 6))}


def snapshot(root):
  """{relative path: (mode, bytes or None for folders)} of everything under ``root``."""
  out = {}
  for folder, dirs, files in os.walk(root):
    for name in dirs + files:
      path = os.path.join(folder, name)
      data = None if name in dirs else open(path, 'rb').read()
      out[os.path.relpath(path, root)] = (os.stat(path).st_mode, data)
  return out


def foreign_folder(path):
  """A folder of someone's files: notes.txt and a subfolder."""
  (path / 'sub').mkdir(parents=True)
  (path / 'notes.txt').write_text('my notes')
  (path / 'sub' / 'data.csv').write_text('a,b\n1,2\n')
  return path


def umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


# Export.


@pytest.fixture(scope='module')
def previous_export(pretrained, tmp_path_factory):
  """An encoder export of the session's pretraining run (tests copy it, never change it)."""
  from mae_jax.tools import export  # pylint: disable=g-import-not-at-top
  return export.export(pretrained[0], str(tmp_path_factory.mktemp('export') / 'hf'),
                       part='encoder')


@pytest.mark.integration
def test_export_overwrite_onto_a_workdir_is_refused_and_the_workdir_is_intact(pretrained,
                                                                              tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(pretrained[0], workdir)
  before = snapshot(workdir)
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  result = subprocess.run(
      [sys.executable, '-m', 'mae_jax.tools.export', '--checkpoint', workdir, '--output', workdir,
       '--overwrite'], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-2000:]
  error = result.stderr.strip().splitlines()[-1]
  assert error.startswith('mae_jax.tools.export: error: ') and 'Traceback' not in result.stderr
  assert 'mae_jax workdir or checkpoint (checkpoints/' in error and 'metrics.jsonl' in error
  assert 'nothing was changed' in error
  assert snapshot(workdir) == before
  assert os.listdir(tmp_path) == ['run']


@pytest.mark.integration
def test_export_overwrite_onto_foreign_files_is_refused(pretrained, previous_export, tmp_path):
  from mae_jax.tools import export  # pylint: disable=g-import-not-at-top
  foreign = foreign_folder(tmp_path / 'mine')
  # A previous export with a file added, and another transformers model's folder.
  extended = tmp_path / 'extended'
  shutil.copytree(previous_export, extended)
  (extended / 'README.md').write_text('my model card')
  other_model = tmp_path / 'other_model'
  shutil.copytree(previous_export, other_model)
  config = json.loads((other_model / 'config.json').read_text())
  del config['mae_jax']
  (other_model / 'config.json').write_text(json.dumps(config))
  before = snapshot(tmp_path)
  for folder, found in ((foreign, r'notes\.txt, sub/'), (extended, r'README\.md'),
                        (other_model, 'config.json without the "mae_jax" entry')):
    with pytest.raises(FileExistsError, match=rf'holds files that are not part of a mae_jax '
                       rf'export \({found}\); --overwrite replaces only .*nothing was changed'):
      export.export(pretrained[0], str(folder), overwrite=True)
  assert snapshot(tmp_path) == before


@pytest.mark.integration
def test_export_overwrite_onto_a_previous_export_replaces_it(pretrained, previous_export,
                                                             tmp_path):
  from mae_jax.tools import export  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'hf'
  shutil.copytree(previous_export, out)
  with pytest.raises(FileExistsError, match=r'exists; pass --overwrite \(overwrite=True\)'):
    export.export(pretrained[0], str(out), part='mae')
  assert export.export(pretrained[0], str(out), part='mae', overwrite=True) == str(out)
  assert json.loads((out / 'config.json').read_text())['architectures'] == [
      'ViTMAEForPreTraining']
  assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors']
  assert os.listdir(tmp_path) == ['hf']  # No temporary or old folder left beside it.
  modes = {name: stat.S_IMODE(os.stat(out / name).st_mode) for name in os.listdir(out)}
  assert modes == {'config.json': 0o666 & ~umask(), 'model.safetensors': 0o666 & ~umask()}


@pytest.mark.integration
def test_a_failing_export_leaves_the_previous_export_and_no_temporary_folder(
    pretrained, previous_export, tmp_path, monkeypatch):
  from mae_jax.tools import export  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'hf'
  shutil.copytree(previous_export, out)
  before = snapshot(tmp_path)
  with pytest.raises(ValueError, match='--part must be one of'):
    export.export(pretrained[0], str(out), part='decoder', overwrite=True)
  assert snapshot(tmp_path) == before
  # The new folder cannot be renamed into place: the old one is put back.
  real_replace = os.replace

  def failing_replace(source, target):
    if 'tmp' in os.path.basename(source):
      raise OSError('disk full')
    return real_replace(source, target)
  monkeypatch.setattr(os, 'replace', failing_replace)
  with pytest.raises(OSError, match='disk full'):
    export.export(pretrained[0], str(out), part='mae', overwrite=True)
  monkeypatch.undo()
  assert snapshot(tmp_path) == before
  # A failure while writing.
  def failing_dump(*_, **__):
    raise OSError('no space')
  monkeypatch.setattr(json, 'dump', failing_dump)
  with pytest.raises(OSError, match='no space'):
    export.export(pretrained[0], str(out), part='mae', overwrite=True)
  assert snapshot(tmp_path) == before


@pytest.mark.integration
def test_exported_files_have_the_mode_of_config_json(previous_export):
  modes = {name: stat.S_IMODE(os.stat(os.path.join(previous_export, name)).st_mode)
           for name in os.listdir(previous_export)}
  assert modes['model.safetensors'] == modes['config.json'] == 0o666 & ~umask(), modes


# Datasets.


def build_small(output, overwrite=False, make_examples=None, **kwargs):
  make_examples = make_examples or functools.partial(build_synthetic.synthetic_examples, seed=0,
                                                     tile_size=16)
  return writer.build_dataset(str(output), UNITS, make_examples,
                              schema.InputContract(tile_size=16), num_shards=2,
                              overwrite=overwrite, **kwargs)


@pytest.fixture(scope='module')
def old_dataset(tmp_path_factory):
  """A small finished dataset (tests copy it, never change it)."""
  path = tmp_path_factory.mktemp('old') / 'ds'
  build_small(path)
  return path


def no_tile(index):
  return [writer.Skip('constant channel')]


def checks_the_old_dataset_is_there(index, old):
  assert os.path.exists(os.path.join(old, 'dataset_info.json')), 'old dataset deleted too early'
  return build_synthetic.synthetic_examples(index, seed=1, tile_size=16)


def test_build_overwrite_onto_foreign_files_is_refused_and_nothing_is_deleted(tmp_path):
  foreign = foreign_folder(tmp_path / 'mine')
  workdir = tmp_path / 'run'
  (workdir / 'checkpoints' / '3' / 'state').mkdir(parents=True)
  (workdir / 'metrics.jsonl').write_text('{}\n')
  before = snapshot(tmp_path)
  with pytest.raises(FileExistsError, match=r'mine holds files that are not part of a dataset '
                     r'made by data_pipeline.writer \(notes\.txt, sub/\); --overwrite replaces '
                     'only .*nothing was changed'):
    build_synthetic.build(str(foreign), tile_size=16, train=4, validation=0, test=2,
                          num_shards=2, overwrite=True)
  with pytest.raises(FileExistsError, match=r'run holds a mae_jax workdir or checkpoint '
                     r'\(checkpoints/, metrics\.jsonl\).*nothing was changed'):
    build_small(workdir, overwrite=True)
  # The real-data build checks the output before planning (this config has no data at all).
  with pytest.raises(FileExistsError, match='notes.txt'):
    build.build(m3leo_config.get_config(), str(foreign), overwrite=True)
  assert snapshot(tmp_path) == before


def test_build_overwrite_with_a_config_error_leaves_the_old_dataset(old_dataset, tmp_path):
  out = tmp_path / 'ds'
  shutil.copytree(old_dataset, out)
  before = snapshot(tmp_path)
  with pytest.raises(FileExistsError, match=r'exists; pass --overwrite \(overwrite=True\)'):
    build_small(out)
  # Every unit is skipped: the writer refuses the empty shards (use fewer shards) mid-build.
  with pytest.raises(ValueError, match='use fewer shards'):
    build_small(out, overwrite=True, make_examples=no_tile)
  assert snapshot(tmp_path) == before
  assert tfds.builder_from_directory(str(out)).info.splits['train'].num_examples == 4


def test_ingest_build_overwrite_with_a_config_error_leaves_the_old_dataset(tmp_path):
  aoi, written = _build_area(tmp_path)
  config = m3leo_config.get_config()
  config.areas[0].dir = str(aoi)
  config.tile_size = SIZE
  config.num_shards = 1
  out = tmp_path / 'ds'
  build.build(config, str(out))
  assert build.SPLIT_MAP in os.listdir(out)
  before = snapshot(out)
  # The only training chip gets a constant channel (skipped): its shard would be empty.
  train_id, _ = CHIPS[0]
  bands = written[train_id].copy()
  bands[10] = 0
  with rasterio.open(aoi / m3leo.S1_DATASET / f'{train_id}.tif', 'r+') as f:
    f.write(bands)
  with pytest.raises(ValueError, match='none of its 1 units gave a tile'):
    build.build(config, str(out), overwrite=True)
  assert snapshot(out) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ds', 'europe']


def test_build_overwrite_onto_an_old_dataset_replaces_it_once_complete(old_dataset, tmp_path):
  out = tmp_path / 'ds'
  shutil.copytree(old_dataset, out)
  (out / writer.INSPECT_DIR).mkdir()  # data_pipeline.ingest.inspect's report of the old one.
  (out / writer.INSPECT_DIR / 'report.txt').write_text('old report')
  make_examples = functools.partial(checks_the_old_dataset_is_there, old=str(out))
  _, report = build_small(out, overwrite=True, make_examples=make_examples)
  assert report['train']['examples'] == 4
  assert os.listdir(tmp_path) == ['ds']  # No temporary or old folder left beside it.
  built = snapshot(out)
  assert writer.INSPECT_DIR not in built
  build_small(tmp_path / 'clean', make_examples=functools.partial(
      build_synthetic.synthetic_examples, seed=1, tile_size=16))
  assert sorted(built) == sorted(snapshot(tmp_path / 'clean'))
  builder = tfds.builder_from_directory(str(out))
  tile_ids = {e[schema.TILE_ID].decode() for e in tfds.as_numpy(builder.as_dataset('train'))}
  assert tile_ids == {f'syn-1-{i:07d}' for i in range(4)}


def test_an_interrupted_build_without_overwrite_still_resumes_in_place(tmp_path):
  out = tmp_path / 'ds'
  with pytest.raises(ValueError, match='use fewer shards'):
    build_small(out, make_examples=no_tile)
  assert os.path.exists(out / writer.BUILD_FILE)  # Unfinished: kept for a resume.
  with pytest.raises(ValueError, match=r'unfinished build .*pass --overwrite \(overwrite=True\)'):
    writer.build_dataset(str(out), UNITS, no_tile, schema.InputContract(tile_size=16),
                         num_shards=1)
  build_small(out)
  assert tfds.builder_from_directory(str(out)).info.splits['test'].num_examples == 2


def test_a_read_only_output_folder_is_named_before_any_work(old_dataset, tmp_path, monkeypatch):
  out = tmp_path / 'ds'
  shutil.copytree(old_dataset, out)
  empty = tmp_path / 'empty'
  empty.mkdir()
  before = snapshot(tmp_path)
  read_only = {str(out), str(empty)}
  real_access = os.access
  monkeypatch.setattr(os, 'access', lambda path, mode: os.fspath(path) not in read_only
                      and real_access(path, mode))
  for folder, overwrite in ((out, True), (empty, False)):
    with pytest.raises(PermissionError, match=rf'cannot write the output {folder}: the folder '
                       rf'{folder} is read-only .*nothing was changed'):
      build_small(folder, overwrite=overwrite)
  assert snapshot(tmp_path) == before


def test_replace_swap_puts_the_old_output_back_when_the_new_one_cannot_go_in(tmp_path,
                                                                             monkeypatch):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'a').write_text('old')
  real_replace = os.replace

  def failing_replace(source, target):
    if '.tmp-' in os.fspath(source):
      raise OSError('busy')
    return real_replace(source, target)
  monkeypatch.setattr(os, 'replace', failing_replace)
  with pytest.raises(OSError, match='busy'):
    with replace.written_aside(str(out)) as tmp:
      with open(os.path.join(tmp, 'a'), 'w') as f:
        f.write('new')
  assert os.listdir(tmp_path) == ['out'] and (out / 'a').read_text() == 'old'
  monkeypatch.undo()
  with replace.written_aside(str(out)) as tmp:
    assert stat.S_IMODE(os.stat(tmp).st_mode) == 0o777 & ~umask()  # Not mkdtemp's 0700.
    with open(os.path.join(tmp, 'a'), 'w') as f:
      f.write('new')
  assert os.listdir(tmp_path) == ['out'] and (out / 'a').read_text() == 'new'
