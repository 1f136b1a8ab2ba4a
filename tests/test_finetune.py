"""Fine-tuning: exact encoder restore across meshes, errors, optimiser options, end to end."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import downstream as downstream_configs
from data_pipeline import schema
from mae_jax import checkpoint as ckpt_lib
from mae_jax.trainers import evaluate
from mae_jax.trainers import finetune
from mae_jax import optim
from mae_jax import sharding
from mae_jax.trainers import pretrain
from mae_jax.trainers import study_stats
from mae_jax.models import downstream
from mae_jax.models import mae

pytestmark = pytest.mark.integration


def finetune_config(pretrained, task='vcf', kind='finetune', mesh=None):
  workdir, pre = pretrained
  config = downstream_configs.build(task, kind, 'tiny')
  config.model = ml_collections.ConfigDict(pre.model.to_dict())
  config.model.drop_path_rate = 0.0
  config.dataset.data_dir = pre.dataset.data_dir
  config.dataset.shuffle_buffer = 16
  config.head.options = ({'hidden': (16, 8)} if task == 'vcf' else {'channels': 8}) \
      if kind == 'finetune' else {}
  config.init_checkpoint = workdir
  config.batch_size = 8
  config.total_steps = 4
  config.eval_every_steps = 2
  config.log_every_steps = 2
  config.checkpoint.async_save = False
  if mesh:
    config.mesh.update(mesh)
  return config


def initial_state(config):
  """The state a fine-tuning run starts from, on config.mesh; also the model."""
  mesh = sharding.create_mesh(config.mesh)
  rules = sharding.rules_from_config(config.logical_rules)
  model = downstream.model_from_config(config)
  abstract = jax.eval_shape(lambda r: nn.meta.unbox(downstream.init_variables_fn(model)(r)),
                            jax.random.key(0))['params']
  tx, _ = optim.create_finetune_optimizer(config.optim, config.batch_size, 10, abstract,
                                          depth=config.model.encoder.depth,
                                          freeze_encoder=config.freeze_encoder,
                                          is_encoder_param=downstream.is_encoder_param)
  from data_pipeline import input as data_input  # pylint: disable=g-import-not-at-top
  contract = data_input.HostDataset(config.dataset.data_dir, 'train').contract
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, shardings, _, _ = finetune.setup_state(config, model, tx, mesh, rules, None, contract)
  return state, shardings


@pytest.mark.parametrize('mesh', [dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=2, tensor=2),
                                  dict(data=2, fsdp=2, tensor=1, num_devices=4)])
def test_restores_exactly_the_pretrained_encoder_and_a_fresh_head(pretrained, mesh):
  config = finetune_config(pretrained, 'worldcover', mesh=mesh)
  state, shardings = initial_state(config)
  saved, _ = pretrain.restore_state(pretrained[1], pretrained[0])
  saved_encoder, _ = downstream.split_params(jax.device_get(saved['params']))
  encoder, head = downstream.split_params(jax.device_get(state['params']))
  assert set(encoder) == set(saved_encoder) == {'patch_embed', 'cls_token', 'encoder',
                                                'encoder_norm'}  # tiny: sin-cos positions
  jax.tree.map(np.testing.assert_array_equal, encoder, saved_encoder)  # Bitwise.
  # The head is exactly a fresh initialisation with the run's seed, not anything restored.
  scratch = finetune_config(pretrained, 'worldcover', mesh=mesh)
  scratch.init_checkpoint = ''
  fresh, _ = initial_state(scratch)
  _, fresh_head = downstream.split_params(jax.device_get(fresh['params']))
  jax.tree.map(np.testing.assert_array_equal, head, fresh_head)
  fresh_encoder, _ = downstream.split_params(jax.device_get(fresh['params']))
  assert not np.array_equal(fresh_encoder['patch_embed']['kernel'],
                            encoder['patch_embed']['kernel'])
  # Every restored leaf sits in the sharding of this run's mesh.
  for leaf, target in zip(jax.tree.leaves(state['params']), jax.tree.leaves(shardings['params'])):
    assert leaf.sharding.is_equivalent_to(target, leaf.ndim)


def test_checkpoint_of_another_model_size_is_a_clear_error(pretrained):
  config = finetune_config(pretrained)
  config.model.encoder.width = 64
  with pytest.raises(ValueError, match=r'model\.encoder\.width: checkpoint 32 != config 64'):
    initial_state(config)


def test_input_contract_mismatch_names_the_difference(pretrained):
  config = finetune_config(pretrained)
  directory, step = ckpt_lib.locate(config.init_checkpoint)
  metadata = ckpt_lib.read_metadata(directory, step)
  contract = schema.InputContract.from_dict(metadata['input_contract'])
  other = schema.InputContract.from_dict({**contract.to_dict(), 'clip_range': (-40.0, 20.0),
                                          'band_names': contract.band_names[::-1]})
  with pytest.raises(ValueError, match='band_names') as error:
    finetune.check_pretrained(metadata, 'ckpt', config, other)
  assert 'clip_range' in str(error.value) and 'allow_contract_mismatch' in str(error.value)
  config.allow_contract_mismatch = True
  finetune.check_pretrained(metadata, 'ckpt', config, other)  # Logged, not raised.


def test_locate_accepts_workdir_checkpoints_folder_and_step_folder(pretrained, tmp_path):
  workdir = pretrained[0]
  directory = ckpt_lib.checkpoint_dir(workdir)
  assert ckpt_lib.locate(workdir) == (directory, 3)
  assert ckpt_lib.locate(directory) == (directory, 3)
  assert ckpt_lib.locate(os.path.join(directory, '3')) == (directory, 3)
  with pytest.raises(FileNotFoundError, match='does not exist'):
    ckpt_lib.locate(str(tmp_path / 'missing'))
  with pytest.raises(FileNotFoundError, match='no committed checkpoint'):
    ckpt_lib.locate(str(tmp_path))


def test_layer_decay_scales_match_he_et_al():
  params = {'patch_embed': {'kernel': 0}, 'cls_token': 0, 'encoder': {
      'block_0': {'mlp': {'kernel': 0}}, 'block_1': {'norm1': {'scale': 0}}},
            'encoder_norm': {'scale': 0}, 'head': {'out': {'kernel': 0}}}
  scales = optim.layer_decay_scales(params, depth=2, decay=0.5)
  # Layer ids: embeddings 0, block i -> i + 1, the rest depth + 1; scale = decay ** (3 - id).
  assert scales['patch_embed']['kernel'] == scales['cls_token'] == 0.125
  assert scales['encoder']['block_0']['mlp']['kernel'] == 0.25
  assert scales['encoder']['block_1']['norm1']['scale'] == 0.5
  assert scales['encoder_norm']['scale'] == scales['head']['out']['kernel'] == 1.0
  scanned = optim.layer_decay_scales({'encoder': {'blocks': {'k': jnp.zeros((2, 3, 4))}}}, 2, 0.5)
  np.testing.assert_allclose(np.asarray(scanned['encoder']['blocks']['k']).ravel(), [0.25, 0.5])


def test_frozen_encoder_does_not_move_and_head_does(pretrained, tmp_path):
  config = finetune_config(pretrained, 'vcf', 'linear_probe')
  config.optim.weight_decay = 0.1  # Decay must not move frozen params either.
  config.total_steps = 2
  finetune.finetune(config, str(tmp_path))
  directory, step = ckpt_lib.locate(str(tmp_path))
  state, _ = pretrain.restore_state(pretrained[1], pretrained[0])
  target = {'params': jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                   downstream.split_params(state['params'])[0])}
  restored = ckpt_lib.restore_subtree(directory, step, target)['params']
  jax.tree.map(np.testing.assert_array_equal, restored,
               downstream.split_params(jax.device_get(state['params']))[0])
  # The head did train: every head kernel differs from its initial value (same seed, same init).
  initial = nn.meta.unbox(downstream.init_variables_fn(
      downstream.model_from_config(config, train=True))(jax.random.key(config.seed)))
  initial_head = downstream.split_params(initial['params'])[1]
  head_target = {'params': jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                        initial_head)}
  trained_head = ckpt_lib.restore_subtree(directory, step, head_target)['params']
  kernels = [(path, a, b) for (path, a), b in zip(
      jax.tree_util.tree_flatten_with_path(trained_head)[0], jax.tree.leaves(initial_head))
             if 'kernel' in jax.tree_util.keystr(path)]
  assert kernels
  for path, trained, init in kernels:
    assert np.abs(np.asarray(trained) - np.asarray(init)).max() > 0, jax.tree_util.keystr(path)
  metadata = ckpt_lib.read_metadata(directory, step)
  assert metadata['task'] == 'finetune' and metadata['head_kind'] == 'linear_probe'


def test_fine_tuning_logs_throughput_and_validation_only_where_measured(pretrained, tmp_path,
                                                                        capsys):
  config = finetune_config(pretrained)
  config.eval_every_steps = 3  # Validation at steps 3 and 4 (the last); logs at 1, 2 and 4.
  finetune.finetune(config, str(tmp_path))
  with open(tmp_path / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  validated = [r['step'] for r in records if 'val_loss' in r]
  assert validated == [3, 4]  # Never repeated at later log steps.
  for name in ('val_rmse', 'val_mae', 'val_bias', 'val_r2'):  # The task's metrics, same steps.
    assert [r['step'] for r in records if name in r] == [3, 4], name
  assert not any('val_miou' in r for r in records)
  for r in records:
    if 'val_rmse' in r:  # MSE is the VCF loss: RMSE is its root, MAE at most RMSE.
      assert r['val_rmse'] == pytest.approx(np.sqrt(r['val_loss']), rel=1e-5)
      assert 0 < r['val_mae'] <= r['val_rmse'] * (1 + 1e-6)
  out = capsys.readouterr().out
  summary = out[out.index('Fine-tuning done: vcf finetune, 4 steps'):]
  assert 'evaluated step ' in summary and 'lowest validation loss' in summary
  assert '  validation: all rmse ' in summary and '  test: all rmse ' in summary
  assert 'rmse by region: ' in summary
  assert (f'Outputs in {tmp_path}: final_metrics.json, metrics.jsonl, tensorboard/, '
          'checkpoints/.') in summary
  # TensorBoard has the same scalars at the same steps.
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(str(tmp_path / 'tensorboard'))
  events.Reload()
  tags = events.Tags()
  tensors = tags.get('tensors', []) + tags.get('scalars', [])
  assert {'val_loss', 'val_rmse', 'val_r2'} <= set(tensors)
  read = events.Tensors if 'val_rmse' in tags.get('tensors', []) else events.Scalars
  assert [e.step for e in read('val_rmse')] == [3, 4]
  logged = [r for r in records if 'loss' in r]
  assert [r['step'] for r in logged] == [1, 2, 4]
  for r in logged[1:]:  # The first log starts the throughput clock.
    assert r['img_per_s'] > 0 and r['eta_min'] >= 0 and 0 < r['mfu'] < 10


def test_fine_tuning_resume_with_another_data_order_is_refused(pretrained, tmp_path):
  config = finetune_config(pretrained)
  config.stop_at_step = 2
  assert finetune.finetune(config, str(tmp_path))['stopped']
  config.dataset.data_shards = 2  # The same subset cut in two parts: another order.
  with pytest.raises(ValueError, match=r'resuming here would change the order of the training '
                     r"data \(data_shards: checkpoint 1 != now 2.*allow_new_data_order"):
    finetune.finetune(config, str(tmp_path))
  config.dataset.allow_new_data_order = True
  assert finetune.finetune(config, str(tmp_path))['stopped']  # Up to stop_at_step again: 2.


def test_drop_path_is_identity_when_deterministic_and_random_in_training(pretrained):
  config = finetune_config(pretrained)
  config.model.drop_path_rate = 0.5
  model = downstream.model_from_config(config, train=False)
  variables = downstream.init_variables_fn(model)(jax.random.key(0))
  variables = nn.meta.unbox(variables)
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 12))
  a = model.apply(variables, images)
  b = model.apply(variables, images, rngs={'dropout': jax.random.key(2)})
  np.testing.assert_array_equal(a, b)
  train_model = model.clone(train=True)
  c = train_model.apply(variables, images, rngs={'dropout': jax.random.key(2)},
                        mutable=['batch_stats'])[0]
  d = train_model.apply(variables, images, rngs={'dropout': jax.random.key(3)},
                        mutable=['batch_stats'])[0]
  assert not np.allclose(c, d)


@pytest.mark.parametrize('task', ['vcf', 'worldcover'])
def test_finetune_then_offline_evaluation_on_another_mesh_agree(pretrained, tmp_path, task):
  config = finetune_config(pretrained, task)
  config.label_fraction = 0.25
  workdir = str(tmp_path / 'run')
  results = finetune.finetune(config, workdir)
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    assert json.load(f)['selected_step'] == results['selected_step']
  assert results['selected_step'] in (2, 4)
  assert results['num_train_examples'] == 16  # 25 % of the 64 training tiles.
  headline = 'rmse' if task == 'vcf' else 'miou'
  test = results['splits']['test']
  assert evaluate.ALL in test and np.isfinite(test[evaluate.ALL][headline])
  # The validation logged at the selected step is the final validation of the selected params.
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records if f'val_{headline}' in r] == [2, 4]
  selected = next(r for r in records if r['step'] == results['selected_step'] and 'val_loss' in r)
  final = results['splits']['validation'][evaluate.ALL]
  for name, key in evaluate.LOGGED_METRICS[task]:
    assert selected[f'val_{name}'] == pytest.approx(final[key], rel=1e-5, abs=1e-6), name
  assert selected['val_loss'] == pytest.approx(final['loss'], rel=1e-5)
  # The per-tile test statistics (the study's bootstrap unit) add up to the test metrics.
  tiles = study_stats.load_tile_stats(os.path.join(workdir, study_stats.TILE_STATS_FILE))
  assert str(tiles['task']) == task
  for region, metrics in test.items():
    keep = (np.ones(tiles['region'].shape, bool) if region == evaluate.ALL else
            tiles['region'] == schema.REGIONS.index(region))
    if task == 'vcf':
      assert np.sqrt(np.nanmean(tiles['sq_error'][keep])) == pytest.approx(
          metrics['rmse'], rel=1e-5)
    else:
      np.testing.assert_array_equal(tiles['confusion'][keep].sum(0),
                                    metrics['confusion_matrix'])

  from configs import evaluate as evaluate_configs  # pylint: disable=g-import-not-at-top
  eval_config = evaluate_configs.get_config()
  eval_config.checkpoint = os.path.join(workdir, 'checkpoints', '4')
  eval_config.mesh.update(dict(data=2, fsdp=2, tensor=2))
  offline = evaluate.evaluate_checkpoint(eval_config)
  out = os.path.join(workdir, 'eval', '4')
  with open(os.path.join(out, 'metrics.json')) as f:
    written = json.load(f)
  for split in ('validation', 'test'):
    for region, metrics in results['splits'][split].items():
      assert written['splits'][split][region][headline] == pytest.approx(
          metrics[headline], rel=1e-5, abs=1e-6)
      assert offline['splits'][split][region]['loss'] == pytest.approx(metrics['loss'], rel=1e-5)
  assert os.path.exists(os.path.join(out, 'predictions_test.png'))
  if task == 'worldcover':
    with open(os.path.join(out, 'confusion_test.json')) as f:
      matrix = np.array(json.load(f)['matrix'])
    assert matrix.shape == (schema.NUM_CLASSES, schema.NUM_CLASSES)
    assert matrix.sum() == written['splits']['test'][evaluate.ALL]['num_pixels']


def test_a_study_cell_run_twice_gives_bitwise_equal_metrics(pretrained, tmp_path):
  # Run-to-run determinism on the CPU: the study's figures are reproducible, not only close.
  config = finetune_config(pretrained, 'worldcover')
  config.label_fraction = 0.25
  outputs = []
  for name in ('first', 'second'):
    finetune.finetune(config, str(tmp_path / name))
    outputs.append([(tmp_path / name / file).read_bytes()
                    for file in ('final_metrics.json', study_stats.TILE_STATS_FILE)])
  assert outputs[0] == outputs[1]


def test_evaluating_a_pretraining_checkpoint_is_a_clear_error(pretrained):
  from configs import evaluate as evaluate_configs  # pylint: disable=g-import-not-at-top
  eval_config = evaluate_configs.get_config()
  eval_config.checkpoint = pretrained[0]
  with pytest.raises(ValueError, match="'pretrain' checkpoint"):
    evaluate.evaluate_checkpoint(eval_config)


def test_encoder_param_names_cover_the_mae_encoder():
  model = mae.MaskedAutoencoder(image_size=32, patch_size=16, width=32, depth=1, heads=2,
                                mlp_dim=32, decoder_width=32, decoder_depth=1, decoder_heads=2,
                                decoder_mlp_dim=32, pos_embedding='learned')
  from mae_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  params = jax.eval_shape(state_lib.init_params_fn(model), jax.random.key(0))
  encoder = {k for k in params if k in mae.ENCODER_PARAMS}
  assert encoder == set(mae.ENCODER_PARAMS)
  assert set(params) - encoder == {'decoder_embed', 'mask_token', 'decoder_pos_embedding',
                                   'decoder', 'decoder_norm', 'decoder_pred'}


def test_study_grid_selects_lr_on_validation_and_resumes(pretrained, tmp_path):
  from configs import study as study_configs  # pylint: disable=g-import-not-at-top
  from mae_jax.trainers import study  # pylint: disable=g-import-not-at-top
  from mae_jax.trainers import study_report  # pylint: disable=g-import-not-at-top
  config = study_configs.get_config('quick')
  config.data_dir = pretrained[1].dataset.data_dir
  config.pretrain_checkpoint = pretrained[0]
  config.tasks = ('vcf',)
  config.fractions = (0.1, 1.0)
  config.seeds = (0, 1)
  config.lr_sweep = (1e-3, 3e-3)
  config.test_regions = ('all',)
  config.finetune_overrides = ml_collections.ConfigDict(dict(
      model=pretrained[1].model.to_dict(), head={'options': {'hidden': (16, 8)}}, batch_size=8,
      total_steps=2, eval_every_steps=1, dataset={'shuffle_buffer': 16}))
  workdir = str(tmp_path / 'study')
  paths = study.run_study(config, workdir)
  rows = study_report.read_csv(paths['csv'])
  assert len(rows) == 2 * 2 * 2  # fractions x inits x seeds, one region
  with open(os.path.join(workdir, 'selected_lr.json')) as f:
    selected = json.load(f)
  for row in rows:
    lr = selected[f"vcf/{row['init']}/{row['fraction']:g}"]
    assert row['lr'] == lr
    # The selected rate has the lowest validation loss of the sweep, for both inits alike.
    losses = {}
    for candidate in config.lr_sweep:
      with open(os.path.join(study.run_dir(workdir, 'vcf', row['init'], row['fraction'],
                                           candidate, 0), 'final_metrics.json')) as f:
        losses[candidate] = json.load(f)['splits']['validation']['all']['loss']
    assert lr == min(losses, key=losses.get)
  assert {r['num_train_examples'] for r in rows if r['fraction'] == 0.1} == {6}  # of 64 tiles
  markdown = open(paths['markdown']).read()
  assert os.path.exists(paths['plot']) and 'Label savings' in markdown
  # Which code, command and seeds made the table; every cell with its interval.
  assert '- Commit: `' in markdown and '- Seeds 0, 1;' in markdown and 'all 16.' in markdown
  assert '| all (16) | 10 |' in markdown and '% interval' in markdown
  # Finished runs are read back, not rerun: the same table, no file rewritten.
  marker = os.path.join(study.run_dir(workdir, 'vcf', 'scratch', 1.0, rows[0]['lr'], 1),
                        'final_metrics.json')
  before = os.stat(marker).st_mtime_ns
  again = study.run_study(config, workdir)
  assert study_report.read_csv(again['csv']) == rows
  assert os.stat(marker).st_mtime_ns == before


def test_interrupted_finetuning_resumes_to_the_same_params(pretrained, tmp_path):
  config = finetune_config(pretrained, 'worldcover')
  config.model.drop_path_rate = 0.1  # Resumed drop-path draws must match too.
  config.checkpoint.every_steps = 1000
  whole = finetune.finetune(config, str(tmp_path / 'whole'))
  config.stop_at_step = 3
  assert finetune.finetune(config, str(tmp_path / 'split')) == {'step': 3, 'stopped': True}
  config.stop_at_step = 0
  resumed = finetune.finetune(config, str(tmp_path / 'split'))
  assert resumed['selected_step'] == whole['selected_step']
  assert resumed['splits'] == whole['splits']
  directory_a, step_a = ckpt_lib.locate(str(tmp_path / 'whole'))
  directory_b, step_b = ckpt_lib.locate(str(tmp_path / 'split'))
  assert step_a == step_b == 4
  config.init_checkpoint = ''
  fresh, _ = initial_state(config)
  target = {'params': jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), fresh['params'])}
  params_a = ckpt_lib.restore_subtree(directory_a, 4, target)['params']
  params_b = ckpt_lib.restore_subtree(directory_b, 4, target)['params']
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params_a),
               jax.device_get(params_b))  # Bitwise (on the same mesh; another mesh changes
  # the order of reductions, hence float rounding).
