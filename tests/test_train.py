"""End-to-end pretraining invariants: sharded == single device, exact resume, cross-mesh restore."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from mae_jax.trainers import pretrain
from tiny_config import losses, make_tiny_config, run

pytestmark = pytest.mark.integration


# Three steps on each mesh; the single-device run also draws a reconstruction plot.
MESHES = {
    'one': {'mesh.num_devices': 1, 'image_every_steps': 3},
    'dp4_fsdp2': {'mesh.data': 4, 'mesh.fsdp': 2},
    'dp2_fsdp2_tp2': {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2},
}


@pytest.fixture(scope='module')
def mesh_runs(tiny_dataset, tmp_path_factory):
  """{mesh name: (workdir, config)} of a 3-step pretraining on each of :data:`MESHES`, shared
  by the tests below, which only read them (a test that writes copies the workdir first)."""
  root = tmp_path_factory.mktemp('meshes')
  return {name: (root / name, run(make_tiny_config(tiny_dataset), root / name, **overrides))
          for name, overrides in MESHES.items()}


def test_loss_on_meshes_equals_single_device(mesh_runs):
  single = losses(mesh_runs['one'][0])
  for name in ('dp4_fsdp2', 'dp2_fsdp2_tp2'):
    sharded = losses(mesh_runs[name][0])
    assert sorted(sharded) == [1, 2, 3]
    for step in (1, 2, 3):
      np.testing.assert_allclose(sharded[step], single[step], rtol=1e-5, err_msg=f'{name} step {step}')


def test_resume_equals_uninterrupted_run(tiny_config, tmp_path):
  config = run(tiny_config, tmp_path / 'straight', total_steps=6)
  run(tiny_config, tmp_path / 'resumed', total_steps=6, stop_at_step=3)
  assert sorted(os.listdir(tmp_path / 'resumed' / 'checkpoints')) == ['3']
  run(tiny_config, tmp_path / 'resumed', total_steps=6)
  straight, _ = pretrain.restore_state(config, str(tmp_path / 'straight'))
  resumed, _ = pretrain.restore_state(config, str(tmp_path / 'resumed'))
  assert int(resumed['step']) == 6
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight['params']),
               jax.device_get(resumed['params']))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight['opt_state']),
               jax.device_get(resumed['opt_state']))


def test_checkpoint_restores_on_another_mesh(mesh_runs):
  workdir, config = mesh_runs['dp4_fsdp2']
  saved, _ = pretrain.restore_state(config, str(workdir))
  other = config.copy_and_resolve_references()
  other.mesh.update(dict(data=2, fsdp=2, tensor=2))
  restored, metadata = pretrain.restore_state(other, str(workdir))
  kernel = restored['params']['encoder']['block_0']['mlp']['fc1']['kernel']
  assert kernel.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')
  assert kernel.sharding.mesh.shape['tensor'] == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(saved['params']),
               jax.device_get(restored['params']))
  assert metadata['input_contract']['band_names'][0] == 'vv_minus_vh_winter'


def test_workdir_has_logs_plots_and_contract(mesh_runs):
  workdir, config = mesh_runs['one']
  assert set(losses(workdir)) == {1, 2, 3}
  assert os.listdir(workdir / 'plots') == ['reconstruction_0000003.png']
  events = os.listdir(workdir / 'tensorboard')
  assert any(name.startswith('events.out.tfevents') for name in events)
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['total_steps'] == 3
  _, metadata = pretrain.restore_state(config, str(workdir))
  contract = metadata['input_contract']
  assert contract['units'] == 'dB' and contract['storage_dtype'] == 'float16'
  assert len(contract['mean']) == len(contract['std']) == 12
  assert contract['clip_range'] == [-50.0, 30.0]
  assert metadata['architecture']['patch_size'] == 16


def test_checkpoint_of_another_model_is_refused(mesh_runs, tmp_path):
  workdir, config = mesh_runs['dp4_fsdp2']
  shutil.copytree(workdir, tmp_path / 'wd')
  with pytest.raises(ValueError, match=r'model\.encoder\.width: checkpoint 32 != config 64'):
    run(config, tmp_path / 'wd', total_steps=4, **{'model.encoder.width': 64})


def test_gradient_accumulation_equals_the_full_batch(tiny_config):
  import functools
  import flax.linen as nn
  from mae_jax import optim, sharding, state as state_lib
  from mae_jax.trainers import pretrain_step
  from mae_jax.models import mae as mae_lib
  config = tiny_config
  model = mae_lib.model_from_config(config.model)
  tx, schedule = optim.create_optimizer(config.optim, 8, 10)
  mesh = sharding.create_mesh(config.mesh)
  rules = sharding.rules_from_config(config.logical_rules)
  images = np.random.default_rng(0).normal(-12, 4, (8, 32, 32, 12)).astype(np.float16)
  mean, std = np.full(12, -12.0, np.float32), np.full(12, 4.0, np.float32)
  results = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    _, shardings = state_lib.state_shardings(model, tx, mesh, rules)
    for accum in (1, 2):
      state = state_lib.create_state(model, tx, jax.random.key(0), shardings)
      step = jax.jit(functools.partial(pretrain_step.train_step, model=model, tx=tx,
                                       schedule=schedule, mean=mean, std=std, seed=0,
                                       accum_steps=accum))
      state, metrics = step(state, {'image': jax.device_put(images, sharding.batch_sharding(mesh))})
      state, metrics = step(state, {'image': jax.device_put(images, sharding.batch_sharding(mesh))})
      results.append((jax.device_get(state['params']), float(metrics['loss'])))
  # Every value is valid, so the mean of the micro-batch losses is the full-batch loss.
  np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), *[r[0] for r in results])


def test_restoring_from_a_missing_workdir_is_a_clear_error(tiny_config, tmp_path):
  with pytest.raises(FileNotFoundError, match='no checkpoints folder in .*nowhere'):
    pretrain.restore_state(tiny_config, str(tmp_path / 'nowhere'))
  assert not (tmp_path / 'nowhere').exists()
