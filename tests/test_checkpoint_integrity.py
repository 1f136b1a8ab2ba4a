"""Checkpoints prove themselves: checksums, damaged steps, fallback, failed saves, honest logs.

Each test reproduces a way data used to be lost or a wrong state restored without a word.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tensorboard.backend.event_processing import plugin_event_accumulator

from mae_jax import checkpoint as ckpt_lib
from mae_jax import fingerprint
from mae_jax.trainers import pretrain
from mae_jax.trainers import resume
from damage import CHECKPOINT_DAMAGE, flip_bytes, largest_data_file
from tiny_config import run


# --- Fingerprints ----------------------------------------------------------------------------


def numpy_fingerprint(array: np.ndarray) -> list[int]:
  """A second implementation of mae_jax.fingerprint in numpy, with Python integers."""
  array = np.asarray(array)
  if array.dtype.itemsize == 4:
    words = array.view(np.uint32).reshape(-1).astype(np.uint64)
  else:
    words = array.view({2: np.uint16, 1: np.uint8}[array.dtype.itemsize]).reshape(-1)
    words = words.astype(np.uint64)
  mask = 2**32 - 1
  sum_a = sum_b = 0
  for position, word in enumerate(int(w) for w in words):
    weight_a = ((position * 0x9E3779B1) & mask) | 1
    weight_b = (((position ^ 0x5BD1E995) * 0x85EBCA77) & mask) | 1
    rotated = ((word << 16) | (word >> 16)) & mask
    sum_a = (sum_a + word * weight_a) & mask
    sum_b = (sum_b + rotated * weight_b) & mask
  return [sum_a, sum_b]


def test_fingerprints_match_numpy_and_do_not_depend_on_sharding():
  rng = np.random.default_rng(0)
  tree = {'w': rng.normal(size=(8, 6)).astype(np.float32),
          'b': rng.normal(size=(5,)).astype(jnp.bfloat16), 'step': np.int32(7)}
  single = fingerprint.fingerprints(jax.tree.map(jnp.asarray, tree))
  for name, array in tree.items():
    assert single[f"['{name}']"] == numpy_fingerprint(array), name
  mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), ('x', 'y'))
  sharded = dict(jax.tree.map(jnp.asarray, tree),
                 w=jax.device_put(tree['w'], NamedSharding(mesh, P('x', 'y'))))
  assert fingerprint.fingerprints(sharded) == single


def test_one_flipped_bit_anywhere_changes_the_fingerprint():
  values = np.random.default_rng(1).normal(size=(64,)).astype(np.float32)
  reference = fingerprint.fingerprints({'x': jnp.asarray(values)})
  for position in (0, 17, 63):
    flipped = values.copy()
    flipped.view(np.uint32)[position] ^= np.uint32(1 << 9)
    assert fingerprint.mismatches({'x': jnp.asarray(flipped)}, reference) == ["['x']"]


# --- Damaged checkpoints ---------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize('damage', sorted(CHECKPOINT_DAMAGE))
def test_a_damaged_step_is_refused_in_one_line(pretrained, tmp_path, damage):
  workdir, config = pretrained
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  CHECKPOINT_DAMAGE[damage](str(copy / 'checkpoints' / '3'))
  intact, _ = pretrain.restore_state(config, workdir)
  target = {'params': jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), intact['params'])}
  full = lambda: pretrain.restore_state(config, str(copy))[0]
  # Partial restores (fine-tuning's encoder, export, embeddings) check too.
  partial = lambda: ckpt_lib.restore_subtree(str(copy / 'checkpoints'), 3, target)
  raised = {}
  for name, restore in (('full', full), ('partial', partial)):
    try:
      restored = restore()
    except ckpt_lib.CheckpointDamaged as error:
      message = str(error)
      assert message.startswith(f'{copy}/checkpoints/3: '), message
      assert '\n' not in message and len(message) < 600, message
      raised[name] = True
    else:
      # Orbax may not need the damaged part (the state's own _METADATA with a full target; for
      # the params alone, a data file holding only optimiser state): then what it restored
      # must be exactly what was saved, never silently wrong.
      jax.tree.map(np.testing.assert_array_equal, jax.device_get(intact['params']),
                   jax.device_get(restored['params']))
      if name == 'full':
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(intact),
                     jax.device_get(restored))
  if damage != 'missing state/_METADATA':
    assert raised.get('full'), f'{damage}: the full state restored without a word'


@pytest.mark.integration
def test_resume_falls_back_past_a_damaged_step_and_ends_bitwise_equal(tiny_config, tmp_path,
                                                                      capsys):
  config = run(tiny_config, tmp_path / 'straight', total_steps=8)
  saves = {'checkpoint.every_steps': 2, 'checkpoint.keep': 3}
  run(tiny_config, tmp_path / 'resumed', total_steps=8, stop_at_step=6, **saves)
  checkpoints = tmp_path / 'resumed' / 'checkpoints'
  assert sorted(os.listdir(checkpoints)) == ['2', '4', '6']
  flip_bytes(largest_data_file(str(checkpoints / '6')))
  with pytest.raises(ckpt_lib.CheckpointDamaged, match='strict=True: not falling back to step 4'):
    run(tiny_config, tmp_path / 'resumed', total_steps=8, **saves, **{'checkpoint.strict': True})
  assert sorted(os.listdir(checkpoints)) == ['2', '4', '6']  # strict changed nothing.
  capsys.readouterr()
  run(tiny_config, tmp_path / 'resumed', total_steps=8, **saves)
  out = capsys.readouterr().out
  assert 'Checkpoint step 6 cannot be restored' in out and 'Falling back to step 4.' in out
  assert os.listdir(tmp_path / 'resumed' / resume.DAMAGED_DIR) == ['6']  # Kept, not deleted.
  straight, _ = pretrain.restore_state(config, str(tmp_path / 'straight'))
  resumed, _ = pretrain.restore_state(config, str(tmp_path / 'resumed'))
  assert int(resumed['step']) == 8
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight['params']),
               jax.device_get(resumed['params']))
  # metrics.jsonl reads as one run: steps 5 and 6 of the lost work appear once, re-logged.
  with open(tmp_path / 'resumed' / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  with open(tmp_path / 'straight' / 'metrics.jsonl') as f:
    straight_rows = [json.loads(line) for line in f]
  assert [r['step'] for r in rows] == list(range(1, 9))
  assert [r['loss'] for r in rows] == [r['loss'] for r in straight_rows]
  # So does TensorBoard's view (three event files: the lost steps 5 and 6 are purged).
  board = plugin_event_accumulator.EventAccumulator(str(tmp_path / 'resumed' / 'tensorboard'))
  board.Reload()
  losses = [(e.step, float(np.asarray(e.tensor_proto.float_val[0])))
            for e in board.Tensors('loss')]
  assert len(os.listdir(tmp_path / 'resumed' / 'tensorboard')) == 3
  assert losses == [(r['step'], np.float32(r['loss'])) for r in straight_rows]


@pytest.mark.integration
def test_no_step_that_restores_is_a_refusal_that_moves_nothing(pretrained, tmp_path):
  workdir, config = pretrained
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  flip_bytes(largest_data_file(str(copy / 'checkpoints' / '3')))
  with pytest.raises(ckpt_lib.CheckpointDamaged, match='no committed checkpoint .* restores: '
                     'step 3: .*Nothing was moved or deleted'):
    pretrain.train_and_evaluate(config, str(copy))
  assert os.listdir(copy / 'checkpoints') == ['3']


# --- Saves -----------------------------------------------------------------------------------


def test_a_failed_save_names_the_last_good_checkpoint(tmp_path, monkeypatch):
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / 'checkpoints'), async_save=False)
  state = {'step': jnp.int32(1), 'params': {'w': jnp.ones((4,))}}
  checkpointer.save(1, state, {'task': 'test'}, force=True)

  def disk_full(*args, **kwargs):
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(checkpointer.manager, 'save', disk_full)
  with pytest.raises(ckpt_lib.CheckpointSaveFailed,
                     match=r'saving checkpoint step 2 .* failed \(OSError: \[Errno 28\] No space '
                           r'left on device\); last good checkpoint: step 1 '):
    checkpointer.save(2, state, {'task': 'test'}, force=True)
  monkeypatch.undo()

  def async_failure():
    raise OSError('write failed in the background')
  monkeypatch.setattr(checkpointer.manager, 'check_for_errors', async_failure)
  with pytest.raises(ckpt_lib.CheckpointSaveFailed, match='asynchronous .* last good checkpoint: '
                                                          'step 1'):
    checkpointer.save(3, state, {'task': 'test'}, force=True)
  monkeypatch.undo()
  checkpointer.close()


def test_restore_checks_the_checksums_saved_with_the_step(tmp_path):
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / 'checkpoints'), async_save=False)
  state = {'step': jnp.int32(1), 'params': {'w': jnp.arange(8.0)}}
  checkpointer.save(1, state, {'task': 'test'}, force=True)
  restored, metadata = checkpointer.restore(1, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
  np.testing.assert_array_equal(restored['params']['w'], np.arange(8.0))
  assert metadata[ckpt_lib.FINGERPRINTS] == fingerprint.fingerprints(state)
  with pytest.raises(ckpt_lib.CheckpointDamaged, match=r"1 array\(s\) differ .*\['params'\]"):
    ckpt_lib.verify({'params': {'w': jnp.arange(8.0) + 1}}, metadata, 'here')
  checkpointer.close()


# --- Resume rules ----------------------------------------------------------------------------


@pytest.mark.integration
def test_a_resume_that_changes_the_objective_is_refused_unless_allowed(tiny_config, tmp_path):
  workdir = tmp_path / 'run'
  run(tiny_config, workdir, total_steps=4, stop_at_step=2)
  # (Half the devices, so the accumulated micro-batches still divide over the data axis.)
  for field, value in (('model.mask_ratio', 0.5), ('model.norm_pix_loss', 'patch'),
                       ('optim.b2', 0.9), ('optim.grad_accum_steps', 2),
                       ('optim.grad_clip_norm', 1.0)):
    with pytest.raises(ValueError, match=rf'{field}: .* -> .*--config\.allow_changes={field}'):
      run(tiny_config, workdir, total_steps=4, **{field: value, 'mesh.num_devices': 4})
  saved_config = (workdir / 'config.json').read_text()
  assert json.loads(saved_config)['model']['mask_ratio'] == 0.75  # Not overwritten.
  run(tiny_config, workdir, total_steps=4, allow_changes='model.mask_ratio',
      **{'model.mask_ratio': 0.5})
  assert json.loads((workdir / 'config.json').read_text())['model']['mask_ratio'] == 0.5
  with open(workdir / 'config_history.jsonl') as f:
    history = [json.loads(line) for line in f]
  assert [h['config']['model']['mask_ratio'] for h in history] == [0.75]
