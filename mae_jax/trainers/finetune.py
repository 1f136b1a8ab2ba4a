"""Fine-tuning and linear probing on VCF or WorldCover: a linear trainer in labelled sections.

``finetune(config, workdir)`` trains the encoder of ``config.model`` with a fresh head
(``config.head``) on a nested label fraction of the training split, keeps the step with the
lowest validation loss (``config.select_best``), then evaluates it on the validation and test
splits per region. With ``config.init_checkpoint`` the encoder params (only those) are restored
from a pretraining checkpoint into the abstract, sharded target of this run's mesh; the head and
the optimiser start fresh. Without it the same architecture trains from scratch.

State: ``{'step', 'params', 'batch_stats', 'opt_state', 'best': {'params', 'batch_stats',
'loss', 'step'}}``, created sharded; the best copy travels in every checkpoint, so a resumed run
selects exactly as an uninterrupted one. Randomness (head init, drop path, label subset, data
order) derives from ``config.seed`` and the step. The step loop (prefetch, checks, logs with
img/s and the encoder's MFU, saves, stops) is the trainers' shared ``loop.run_steps``. Each
validation logs, at its step only, ``val_loss`` and the task's metrics of the whole validation
split from the same pass (``val_rmse``, ``val_mae``, ``val_bias``, ``val_r2`` for VCF;
``val_miou``, ``val_accuracy`` for WorldCover) to stdout, TensorBoard and ``metrics.jsonl``. A
run that finishes prints a summary: the evaluated step, validation and test metrics (whole split,
headline per region) and where the outputs are.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from data_pipeline import input as data_input
from data_pipeline import quantise
from data_pipeline import schema
from data_pipeline import subsets
from mae_jax import checkpoint as ckpt_lib
from mae_jax import faults
from mae_jax import flops as flops_lib
from mae_jax import optim
from mae_jax import preprocess
from mae_jax import pretrained
from mae_jax import sharding
from mae_jax import state as state_lib
from mae_jax import validate
from mae_jax.models import downstream
from mae_jax.trainers import evaluate
from mae_jax.trainers import loop
from mae_jax.trainers import pretrain as pretrain_lib
from mae_jax.trainers import resume
from mae_jax.trainers import study_stats

# Fields of config.model that decide the encoder's param shapes (the decoder is not restored).
ENCODER_ARCHITECTURE_FIELDS = ('image_size', 'patch_size', 'num_channels', 'encoder',
                               'pos_embedding', 'scan_layers')


class CompileCache:
  """Optimisers and jitted functions by what they close over, for a caller that runs many
  fine-tunings in one process (the label-efficiency study runs dozens differing only in data,
  seed and init values): later runs reuse them and their compiled executables. It belongs to
  that caller; a lone run builds everything afresh. Few entries: executables hold device memory.
  """

  def __init__(self, size: int = 16):
    self._entries: collections.OrderedDict[Any, Any] = collections.OrderedDict()
    self._size = size

  def get(self, key, build):
    if key not in self._entries:
      self._entries[key] = build()
      while len(self._entries) > self._size:
        self._entries.popitem(last=False)
    self._entries.move_to_end(key)
    return self._entries[key]


def cached(cache: CompileCache | None, key, build):
  return cache.get(key, build) if cache is not None else build()


def sharding_key(shardings) -> tuple[Any, ...]:
  return (jax.tree.structure(shardings), tuple(jax.tree.leaves(shardings)))


def encoder_architecture(model_config: dict[str, Any]) -> dict[str, Any]:
  return {k: model_config.get(k) for k in ENCODER_ARCHITECTURE_FIELDS}


# --- Steps ----------------------------------------------------------------------------------


def train_step(state, batch, seed, *, model, tx, schedule, mean, std, task,
               storage=quantise.FLOAT16):
  """One optimiser step: decode, normalise, forward (drop path, BatchNorm batch statistics),
  update.

  ``seed`` is a traced scalar, so runs that differ only in seed share one compiled step.
  ``storage``: the form the batch's images are stored in (the data's, ``data_pipeline.quantise``).
  """
  step = state['step']
  images, _ = preprocess.normalise(batch[schema.IMAGE], mean, std, storage)
  labels = batch[evaluate.label_feature(task)]
  rng = jax.random.fold_in(jax.random.key(seed), step)
  # Records skipped as bad (config.dataset.max_bad_records) carry no label: left out of the loss.
  keep = jnp.ones(images.shape[0], jnp.bool_)
  if faults.BAD_RECORD in batch:
    keep = ~batch[faults.BAD_RECORD]

  def loss_fn(params):
    variables = {'params': params, 'batch_stats': state['batch_stats']}
    output, updates = model.apply(variables, images, rngs={'dropout': rng},
                                  mutable=['batch_stats'])
    loss_sum, count = evaluate.task_loss(task, output, labels, keep)
    return loss_sum / jnp.maximum(count, 1.0), updates.get('batch_stats', {})

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  grad_norm = optax.tree.norm(grads)
  # As in pretraining: a non-finite step changes nothing and the host stops (faults.check_step).
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new = {'params': params, 'batch_stats': batch_stats, 'opt_state': opt_state}
  new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new,
                     {k: state[k] for k in ('params', 'batch_stats', 'opt_state')})
  metrics = {'loss': loss, 'grad_norm': grad_norm, 'lr': schedule(step), 'finite': finite,
             **faults.step_signals(batch)}
  return {**state, 'step': step + 1, **new}, metrics


def no_data_batch(task: str, local_batch: int, dataset) -> dict[str, np.ndarray]:
  """A batch of the training keys and shapes with no valid input or label (faults.Feed)."""
  size, channels = dataset.tile_size, dataset.num_channels
  # The dtype of the data's own batches, or the compiled step would not take it.
  images = quantise.form_of(dataset.contract).nodata((local_batch, size, size, channels))
  if task == 'vcf':
    labels = np.full((local_batch,), np.nan, np.float32)
  else:
    labels = np.full((local_batch, size, size), schema.IGNORE_INDEX, np.uint8)
  return {schema.IMAGE: images, evaluate.label_feature(task): labels}


def keep_best(state, loss):
  """Copies params and statistics into ``state['best']`` if ``loss`` beats the best so far."""
  better = loss < state['best']['loss']
  pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(better, a, b), new, old)
  best = {'params': pick(state['params'], state['best']['params']),
          'batch_stats': pick(state['batch_stats'], state['best']['batch_stats']),
          'loss': jnp.where(better, loss, state['best']['loss']),
          'step': jnp.where(better, state['step'], state['best']['step'])}
  return {**state, 'best': best}


# --- State ----------------------------------------------------------------------------------


def state_shardings(model, tx, mesh, rules):
  """(abstract state, its shardings) from the logical names on the params; nothing allocated."""
  init = downstream.init_variables_fn(model)
  boxed = jax.eval_shape(init, jax.random.key(0))
  specs = nn.get_partition_spec(boxed)
  abstract_vars = jax.eval_shape(lambda r: nn.meta.unbox(init(r)), jax.random.key(0))
  var_shardings = sharding.logical_to_shardings(specs, mesh, rules)
  abstract_params = abstract_vars['params']
  abstract_stats = abstract_vars.get('batch_stats', {})
  replicated = sharding.replicated(mesh)
  abstract_opt, opt_sharding = state_lib.optimizer_shardings(tx, abstract_params,
                                                             var_shardings['params'], mesh)
  scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)
  abstract = {'step': scalar(jnp.int32), 'params': abstract_params, 'batch_stats': abstract_stats,
              'opt_state': abstract_opt,
              'best': {'params': abstract_params, 'batch_stats': abstract_stats,
                       'loss': scalar(jnp.float32), 'step': scalar(jnp.int32)}}
  stats_sharding = var_shardings.get('batch_stats', {})
  shardings = {'step': replicated, 'params': var_shardings['params'],
               'batch_stats': stats_sharding, 'opt_state': opt_sharding,
               'best': {'params': var_shardings['params'], 'batch_stats': stats_sharding,
                        'loss': replicated, 'step': replicated}}
  return abstract, shardings


def create_state(model, tx, rng, shardings, cache: CompileCache | None = None):
  init_fn = cached(cache, ('init', model, tx, sharding_key(shardings)),
                   lambda: jax.jit(functools.partial(_init_state, model=model, tx=tx),
                                   out_shardings=shardings))
  return init_fn(rng)


def _init_state(rng, *, model, tx):
  variables = nn.meta.unbox(downstream.init_variables_fn(model)(rng))
  params, stats = variables['params'], variables.get('batch_stats', {})
  return {'step': jnp.zeros((), jnp.int32), 'params': params, 'batch_stats': stats,
          'opt_state': tx.init(params),
          'best': {'params': params, 'batch_stats': stats,
                   'loss': jnp.full((), jnp.inf, jnp.float32), 'step': jnp.zeros((), jnp.int32)}}


def check_pretrained(metadata: dict[str, Any], where: str, config, contract) -> None:
  """Architecture and input-contract checks of an init checkpoint, with errors naming fields."""
  saved_model = metadata.get('model')
  if not saved_model:
    raise ValueError(f'{where}: no model in the checkpoint metadata; not a mae_jax checkpoint')
  diffs = ckpt_lib.architecture_differences(encoder_architecture(saved_model),
                                            encoder_architecture(config.model.to_dict()))
  if diffs:
    raise ValueError(f'{where} holds another encoder than config.model: ' + '; '.join(diffs)
                     + ' (pick the fine-tuning preset that matches the pretraining one)')
  saved_contract = schema.InputContract.from_dict(metadata['input_contract'])
  contract_diffs = saved_contract.differences(contract)
  if contract_diffs:
    message = (f'the fine-tuning data ({config.dataset.data_dir}) differ from what the encoder '
               f'in {where} was pretrained on: ' + '; '.join(contract_diffs))
    if not config.allow_contract_mismatch:
      raise ValueError(message + ' (set --config.allow_contract_mismatch=True to go on anyway)')
    loop.report('WARNING: ' + message)
  if saved_contract.storage_differences(contract):
    # Accepted: the data are decoded to dB with their own storage form before the encoder's
    # normalisation; what differs is rounding (<= half a uint8 step) and the clipped tails.
    loop.report(f'Note: the encoder in {where} was pretrained on data stored as '
                f'{saved_contract.storage_summary()}, the fine-tuning data are stored as '
                f'{contract.storage_summary()}; both decode to dB, so it takes them.')


def restore_encoder(config, model_abstract, model_shardings, contract):
  """(encoder params restored into ``model_shardings``, checkpoint metadata, 'dir/step').

  The checkpoint's architecture and input contract are checked first (``check_pretrained``).
  """
  directory, step = ckpt_lib.locate(config.init_checkpoint)
  metadata = ckpt_lib.read_metadata(directory, step)
  check_pretrained(metadata, f'{directory}/{step}', config, contract)
  encoder_abstract, _ = downstream.split_params(model_abstract)
  encoder_shardings, _ = downstream.split_params(model_shardings)
  target = {'params': ckpt_lib.abstract_like(encoder_abstract, encoder_shardings)}
  restored = ckpt_lib.restore_subtree(directory, step, target)
  return restored['params'], metadata, f'{directory}/{step}'


def setup_state(config, model, tx, mesh, rules, checkpointer, contract, data_layout=None,
                cache: CompileCache | None = None):
  """The run's first state, sharded on ``mesh``: resumed from the workdir, or new with the
  encoder restored from ``config.init_checkpoint`` (if set).

  Returns (state, state shardings, the input contract to normalise with, init checkpoint).
  Call under ``jax.set_mesh(mesh)`` and the logical rules.
  """
  abstract_state, state_sharding = state_shardings(model, tx, mesh, rules)
  restored = None
  if checkpointer:
    restored = resume.restore_newest(
        checkpointer, ckpt_lib.abstract_like(abstract_state, state_sharding),
        functools.partial(resume.check_same_run, architecture=finetune_architecture(config),
                          data_layout=data_layout, config=config, report=loop.report),
        strict=config.checkpoint.strict, workdir=os.path.dirname(checkpointer.directory),
        report=loop.report)
  init_from = None
  if restored is None:
    state = create_state(model, tx, jax.random.key(config.seed), state_sharding, cache)
    params = None
    if config.init_checkpoint and config.init_from:
      raise ValueError('set config.init_checkpoint (a mae_jax pretraining checkpoint) or '
                       'config.init_from (weights published in PyTorch), not both')
    if config.init_checkpoint:
      encoder, init_metadata, init_from = restore_encoder(config, abstract_state['params'],
                                                          state_sharding['params'], contract)
      contract = schema.InputContract.from_dict(init_metadata['input_contract'])
      params = {**state['params'], **encoder}
      loop.report(f'Restored the encoder from {init_from}; head and optimiser are new.')
    elif config.init_from:
      imported = pretrained.import_weights(config.init_from, model, config.init_from_channels,
                                           part='encoder')
      params = pretrained.place(state['params'], imported, state_sharding['params'])
      init_from = config.init_from
      loop.report(f'Imported the encoder from {init_from}'
             + ''.join(f'; {note}' for note in imported.notes) + '; head and optimiser are new.')
    else:
      loop.report('Training from scratch (no init_checkpoint).')
    if params is not None:
      # The best copy needs buffers of its own: the train step donates the state.
      best_params = jax.tree.map(jnp.copy, params)
      state = {**state, 'params': params, 'best': {**state['best'], 'params': best_params}}
  else:
    state, saved, step = restored
    contract = schema.InputContract.from_dict(saved['input_contract'])
    init_from = saved.get('init_checkpoint')
    loop.report(f'Resumed from {checkpointer.directory}/{step}.')
  return state, state_sharding, contract, init_from


# --- Data -----------------------------------------------------------------------------------


def training_records(config) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Global record indices of the training subset: regions, labelled tiles, label fraction."""
  index = data_input.read_split_index(config.dataset.data_dir, config.dataset.train_split)
  records = subsets.select_records(
      index, regions=tuple(config.dataset.train_regions) or None,
      labelled='vcf' if config.task_name == 'vcf' else None,
      fraction=config.label_fraction, seed=config.seed)
  return records, index


def num_train_steps(config, num_examples: int) -> int:
  if config.total_steps > 0:
    return config.total_steps
  return max(1, math.ceil(config.epochs * num_examples / config.batch_size))


def resolved_optim(config, num_examples: int) -> ml_collections.ConfigDict:
  """config.optim with warmup_epochs turned into steps of this run."""
  optim_config = ml_collections.ConfigDict(config.optim.to_dict())
  if optim_config.warmup_epochs:
    steps_per_epoch = max(1, num_examples // config.batch_size)
    optim_config.warmup_steps = int(round(optim_config.warmup_epochs * steps_per_epoch))
  return optim_config


def eval_every(config, num_examples: int) -> int:
  return config.eval_every_steps or max(1, math.ceil(num_examples / config.batch_size))


# --- Trainer --------------------------------------------------------------------------------


def finetune(config: ml_collections.ConfigDict, workdir: str,
             cache: CompileCache | None = None) -> dict[str, Any]:
  """Runs (or resumes) one fine-tuning run; returns its final metrics.

  ``cache``: a :class:`CompileCache` shared by the runs of one process (the study), or None.
  """
  workdir = loop.resolve_workdir(workdir)
  task = config.task_name
  if task not in ('vcf', 'worldcover'):
    raise validate.ConfigError(f"config.task_name={task!r} must be 'vcf' or 'worldcover'")
  if not 0.0 < config.label_fraction <= 1.0:
    raise validate.ConfigError(f'config.label_fraction={config.label_fraction} must lie in (0, 1]')
  validate.check_model(config.model)
  validate.check_training(config)
  mesh = sharding.create_mesh(config.mesh)
  rules = sharding.rules_from_config(config.logical_rules)
  if not config.dataset.data_dir:
    raise validate.ConfigError('config.dataset.data_dir is empty')

  # --- Data ---------------------------------------------------------------------------------
  records, _ = training_records(config)
  train_data = loop.open_training_stream(config, records)  # As pretraining reads its data.
  validate.check_data(config.model, config.dataset.data_dir, train_data.num_channels,
                      train_data.tile_size)
  total_steps = num_train_steps(config, len(records))
  validate.check_batch(config.batch_size, total_steps, sharding.data_parallel_size(mesh),
                       jax.process_count())
  validate.check_process_rows(sharding.batch_sharding(mesh), config.batch_size,
                              jax.process_count())
  contract = train_data.contract
  local_batch = config.batch_size // jax.process_count()
  eval_batch = config.eval_batch_size or config.batch_size

  workdir_path, writer = loop.prepare_workdir(workdir)

  # --- Model, optimiser, state --------------------------------------------------------------
  train_model = downstream.model_from_config(config, train=True)
  eval_model = train_model.clone(train=False)
  abstract_params = jax.eval_shape(
      lambda r: nn.meta.unbox(downstream.init_variables_fn(eval_model)(r)),
      jax.random.key(0))['params']
  optim_config = resolved_optim(config, len(records))
  tx, schedule = cached(
      cache, ('tx', eval_model, optim_config.to_json(), config.batch_size, total_steps),
      lambda: optim.create_finetune_optimizer(
          optim_config, config.batch_size, total_steps, abstract_params,
          depth=config.model.encoder.depth, freeze_encoder=config.freeze_encoder,
          is_encoder_param=downstream.is_encoder_param))
  checkpointer = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir),
                                       keep=config.checkpoint.keep,
                                       async_save=config.checkpoint.async_save)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules), faults.StopSignal() as stop_signal:
    data_layout = train_data.layout(config.seed, config.batch_size)
    state, state_sharding, contract, init_from = setup_state(config, eval_model, tx, mesh, rules,
                                                             checkpointer, contract, data_layout,
                                                             cache)
    # The encoder keeps the normalisation it was pretrained with; scratch uses this dataset's.
    # The images are decoded as this dataset stores them, which the run's contract records (so
    # that tools using the fine-tuned model prepare inputs as its training data were).
    contract = contract.storage_of(train_data.contract)
    storage = quantise.form_of(train_data.contract)
    mean, std = np.asarray(contract.mean, np.float32), np.asarray(contract.std, np.float32)
    metadata = {'task': 'finetune', 'task_name': task, 'head_kind': config.head.kind,
                'model': config.model.to_dict(), 'architecture': finetune_architecture(config),
                'input_contract': contract.to_dict(), 'init_checkpoint': init_from,
                'label_fraction': config.label_fraction, 'num_train_examples': len(records),
                'data_layout': data_layout, 'config': json.loads(config.to_json_best_effort())}
    start_step = int(jax.device_get(state['step']))
    last_saved = start_step if checkpointer.latest_step() is not None else None
    resume.record_start(workdir, config, start_step, writer)

    batch_sharding = sharding.batch_sharding(mesh)
    def build_functions():
      step_fn = jax.jit(
          functools.partial(train_step, model=train_model, tx=tx, schedule=schedule, mean=mean,
                            std=std, task=task, storage=storage),
          in_shardings=(state_sharding, batch_sharding, None),
          out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=(0,))
      best_fn = jax.jit(keep_best, in_shardings=(state_sharding, None),
                        out_shardings=state_sharding, donate_argnums=(0,))
      return (step_fn, best_fn, evaluate.make_eval_fn(eval_model, mean, std, task, storage),
              evaluate.make_tile_stats_fn(eval_model, mean, std, task, storage))

    step_fn, best_fn, eval_fn, tile_stats_fn = cached(
        cache, ('functions', train_model, tx, tuple(mean.tolist()), tuple(std.tolist()), task,
         storage, sharding_key(state_sharding)), build_functions)
    seed = jnp.int32(config.seed)
    features = (schema.IMAGE, evaluate.label_feature(task))
    eval_features = features + (schema.REGION,)
    # Read at every evaluation: worth keeping in memory too (config.dataset.host_cache).
    val_data = data_input.HostDataset(config.dataset.data_dir, config.dataset.validation_split,
                                      host_cache=config.dataset.host_cache)

    def validation_scalars(variables) -> dict[str, float]:
      """val_loss (what selects the best step) and the task's metrics, from one pass."""
      totals, _ = evaluate.accumulate(
          eval_fn, variables, val_data.eval_batches(eval_batch // jax.process_count(),
                                                    features=eval_features), batch_sharding)
      return evaluate.split_scalars(task, totals, prefix='val_')

    interval = eval_every(config, len(records))
    loop.report(f'{task} {config.head.kind}: {len(records)} training tiles '
           f'(label fraction {config.label_fraction}), steps {start_step} -> {total_steps}, '
           f'validation every {interval} steps; mesh {dict(mesh.shape)}.')
    # stop_at_step ends this process early (with a checkpoint); the schedule still follows
    # total_steps and a later run on the workdir resumes exactly.
    stop_step = min(total_steps, config.stop_at_step or total_steps)
    batches = train_data.batches(local_batch, seed=config.seed, start_step=start_step,
                                 num_steps=max(stop_step - start_step, 0),
                                 shuffle_buffer=config.dataset.shuffle_buffer, features=features)
    feed = faults.Feed(batches, lambda: no_data_batch(task, local_batch, train_data), stop_signal,
                       skip_mode=config.dataset.max_bad_records > 0)
    def between_steps(state, done, batch):  # pylint: disable=unused-argument
      if done % interval and done != total_steps:
        return state, {}
      scalars = validation_scalars({'params': state['params'],
                                    'batch_stats': state['batch_stats']})
      return best_fn(state, jnp.float32(scalars['val_loss'])), scalars

    peak, _ = flops_lib.device_peak_flops(override_tflops=config.peak_tflops_per_device)
    end = loop.run_steps(
        state=state, compile_step=lambda state, batch: lambda s, b: step_fn(s, b, seed),
        feed=feed, batch_sharding=batch_sharding, start_step=start_step, stop_step=stop_step,
        prefetch_depth=config.dataset.device_prefetch, save_every=config.checkpoint.every_steps,
        log_every=config.log_every_steps, checkpointer=checkpointer, metadata=metadata,
        writer=writer, stop_signal=stop_signal, last_saved=last_saved,
        throughput=loop.Throughput(config.batch_size, flops_lib.encoder_train_flops(
            eval_model, frozen=config.freeze_encoder), peak, jax.device_count(), total_steps),
        between_steps=between_steps)
    state = end.state
    checkpointer.close()  # Waits until every save is committed.
    if end.stopped_by:
      writer.close()
      loop.report(loop.stopped_message(end.stopped_by, end.end_step, checkpointer.directory))
      return {'step': end.end_step, 'stopped': True}
    if stop_step < total_steps:
      writer.close()
      loop.report(f'Stopped at step {stop_step} of {total_steps} (config.stop_at_step); run again '
                  'to resume.')
      return {'step': stop_step, 'stopped': True}

    # --- Final evaluation of the selected model ---------------------------------------------
    chosen = state['best'] if config.select_best else state
    variables = {'params': chosen['params'], 'batch_stats': chosen['batch_stats']}
    best_step = int(jax.device_get(state['best']['step'])) if config.select_best else total_steps
    results = evaluate.evaluate_splits(
        task, config.dataset.data_dir, eval_fn, variables, batch_sharding, eval_batch,
        (config.dataset.validation_split, config.dataset.test_split), eval_features)
    results.update({'step': total_steps, 'selected_step': best_step, 'task_name': task,
                    'init_checkpoint': init_from, 'label_fraction': config.label_fraction,
                    'num_train_examples': len(records)})
    # Per-tile test statistics, for the study's intervals (bootstrap over test tiles). Written
    # before final_metrics.json, which marks the run as finished.
    test_tiles = evaluate.tile_stats(
        tile_stats_fn, variables,
        data_input.HostDataset(config.dataset.data_dir, config.dataset.test_split).eval_batches(
            eval_batch // jax.process_count(), features=eval_features), batch_sharding)
    if jax.process_index() == 0:
      study_stats.save_tile_stats(str(workdir_path / study_stats.TILE_STATS_FILE), task,
                                  test_tiles)
      tmp = workdir_path / 'final_metrics.json.tmp'
      tmp.write_text(json.dumps(results, indent=2, sort_keys=True))
      tmp.rename(workdir_path / 'final_metrics.json')
    best_loss = float(jax.device_get(state['best']['loss'])) if config.select_best else None
  writer.close()
  for line in final_summary(config, results, best_loss, workdir, checkpointer.directory):
    loop.report(line)
  return results


def final_summary(config, results: dict[str, Any], best_loss: float | None, workdir: str,
                  checkpoint_dir: str) -> list[str]:
  """The lines printed at the end of a run: what was evaluated, its metrics per split and
  region, where the outputs are."""
  if best_loss is None:
    chosen = 'the last step (config.select_best=False)'
  else:
    chosen = f'step {results["selected_step"]}, the lowest validation loss ({best_loss:.4g})'
  lines = [f'Fine-tuning done: {results["task_name"]} {config.head.kind}, {results["step"]} '
           f'steps on {results["num_train_examples"]} training tiles (label fraction '
           f'{results["label_fraction"]}); evaluated {chosen}.']
  lines += ['  ' + evaluate.summary_line(results['task_name'], split, per_region)
            for split, per_region in results['splits'].items()]
  checkpoints = checkpoint_dir.rstrip('/')
  if checkpoints.startswith(workdir.rstrip('/') + '/'):
    checkpoints = checkpoints[len(workdir.rstrip('/')) + 1:]
  lines.append(f'  Outputs in {workdir}: final_metrics.json, metrics.jsonl, tensorboard/, '
               f'{checkpoints}/.')
  return lines


def finetune_architecture(config) -> dict[str, Any]:
  """What decides the shapes of a fine-tuning state: resuming checks all of it."""
  return {**pretrain_lib.architecture(config.model), 'task_name': config.task_name,
          'head_kind': config.head.kind, 'head_options': config.head.options.to_dict(),
          'freeze_encoder': config.freeze_encoder,
          'layer_decay': config.optim.layer_decay}
