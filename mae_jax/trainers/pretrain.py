"""MAE pretraining: a linear trainer in labelled sections (mesh, data, model, state, loop).

``train_and_evaluate(config, workdir)`` trains ``config.total_steps`` steps, resuming from the
latest checkpoint in ``workdir`` if there is one.

Exact resume. Every random draw derives from (config.seed, step), and the input stream is a
function of (seed, step) alone (``data_pipeline.data_shards``): batch ``t`` is read by
positions computed from ``t``, so the checkpoint's step *is* the input position, restored with
the state at no I/O cost, not a reshuffle. The checkpoint also records the stream's layout
(data shards and their sizes, reader, seed, batch); a resume whose layout differs is refused
(``config.dataset.allow_new_data_order`` overrides). A resumed run therefore reproduces an
uninterrupted one bitwise on the same mesh (on another mesh, up to reduction order).

Faults. SIGTERM/SIGINT: a checkpoint at the next step boundary, committed before exit 0. A
non-finite loss or gradient: the step leaves the state unchanged, training stops with the step
number, nothing more is saved, so the latest checkpoint is the last good one. A batch that
cannot be read: the reader's error (file, record), or, with ``config.dataset.max_bad_records``,
a counted skip. Across processes all of these are agreed at the same step through the batch's
``CONTROL`` column (``mae_jax.faults``), so no host is left waiting for another. The step loop
itself is the trainers' shared ``loop.run_steps``; this module supplies the step (compiled with
the remat policy that fits, ``mae_jax.memory``) and the reconstruction previews between steps.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from data_pipeline import input as data_input
from data_pipeline import quantise
from data_pipeline import render
from data_pipeline import schema
from data_pipeline import subsets
from mae_jax import checkpoint as ckpt_lib
from mae_jax import faults
from mae_jax import flops as flops_lib
from mae_jax import memory
from mae_jax import optim
from mae_jax import plots
from mae_jax import preprocess
from mae_jax import pretrained
from mae_jax import sharding
from mae_jax import state as state_lib
from mae_jax import validate
from mae_jax.models import mae
from mae_jax.trainers import loop
from mae_jax.trainers import pretrain_step
from mae_jax.trainers import resume

# Fields of config.model that decide parameter shapes: a checkpoint must agree on all of them.
ARCHITECTURE_FIELDS = ('image_size', 'patch_size', 'num_channels', 'encoder', 'decoder',
                       'pos_embedding', 'scan_layers')


def architecture(model_config: ml_collections.ConfigDict) -> dict[str, Any]:
  values = model_config.to_dict()
  return {k: values[k] for k in ARCHITECTURE_FIELDS}


def reconstruct(params, stored_images, step, *, model, mean, std, seed,
                storage=quantise.FLOAT16):
  """(original, masked, reconstruction) in dB for a few tiles, as in He et al.'s figures."""
  images, valid = preprocess.normalise(stored_images, mean, std, storage)
  noise = jax.random.uniform(pretrain_step.step_key(seed, step),
                             (images.shape[0], model.num_patches))
  out = model.apply({'params': params}, images, valid, noise)
  target = mae.patchify(images, model.patch_size)
  valid_p = mae.patchify(valid.astype(jnp.float32), model.patch_size)
  patch_mean, patch_var = mae.target_statistics(target, valid_p, model.norm_pix_loss,
                                                model.num_channels)
  pred = out['pred']
  if model.norm_pix_loss != 'none':
    pred = pred * jnp.sqrt(patch_var + 1e-6) + patch_mean
  masked = out['mask'][..., None] > 0
  pasted = jnp.where(masked, pred, target)

  def to_db(patches, hide):
    image = preprocess.denormalise(mae.unpatchify(patches, model.patch_size, model.num_channels),
                                   mean, std)
    hidden = mae.unpatchify(jnp.broadcast_to(hide, patches.shape).astype(jnp.float32),
                            model.patch_size, model.num_channels) > 0
    return jnp.where(valid & ~hidden, image, jnp.nan)

  no_mask = jnp.zeros_like(masked)
  return to_db(target, no_mask), to_db(target, masked), to_db(pasted, no_mask)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) pretraining; returns the last logged metrics (plus 'stopped_by' when a
  signal stopped it early)."""
  workdir = loop.resolve_workdir(workdir)
  # --- Config, mesh and data -------------------------------------------------------------
  validate.check_model(config.model)
  validate.check_training(config)
  mesh = sharding.create_mesh(config.mesh)
  validate.check_batch(config.batch_size, config.total_steps, sharding.data_parallel_size(mesh),
                       jax.process_count(), accum=config.optim.grad_accum_steps)
  batch_sharding = sharding.batch_sharding(mesh)
  validate.check_process_rows(batch_sharding, config.batch_size, jax.process_count())
  rules = sharding.rules_from_config(config.logical_rules)
  if not config.dataset.data_dir:
    raise validate.ConfigError('config.dataset.data_dir is empty: point it at a dataset written '
                               'by data_pipeline (e.g. python -m data_pipeline.build_synthetic)')
  records = None
  if config.dataset.regions:
    index = data_input.read_split_index(config.dataset.data_dir, config.dataset.train_split,
                                        features=(schema.TILE_ID, schema.REGION))
    records = subsets.select_records(index, regions=tuple(config.dataset.regions))
    loop.report(f'Pretraining on {len(records)} of {len(index[schema.TILE_ID])} tiles '
                f'(regions {", ".join(config.dataset.regions)}).')
  dataset = loop.open_training_stream(config, records)
  num_shards = dataset.data_shards
  validate.check_data(config.model, config.dataset.data_dir, dataset.num_channels,
                      dataset.tile_size)
  contract = dataset.contract
  mean, std = np.asarray(contract.mean, np.float32), np.asarray(contract.std, np.float32)
  storage = quantise.form_of(contract)  # Batches stay in it; the step decodes them.
  local_batch = config.batch_size // jax.process_count()
  data_layout = dataset.layout(config.seed, config.batch_size)

  _, writer = loop.prepare_workdir(workdir)

  # --- Model, optimiser, state ----------------------------------------------------------------
  model = mae.model_from_config(config.model)
  tx, schedule = optim.create_optimizer(config.optim, config.batch_size, config.total_steps)
  metadata = {'task': 'pretrain', 'model': config.model.to_dict(),
              'architecture': architecture(config.model), 'input_contract': contract.to_dict(),
              'data_layout': data_layout, 'config': json.loads(config.to_json_best_effort())}
  checkpointer = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir),
                                       keep=config.checkpoint.keep,
                                       async_save=config.checkpoint.async_save)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules), faults.StopSignal() as stop_signal:
    abstract_state, state_sharding = state_lib.state_shardings(model, tx, mesh, rules)
    restored = resume.restore_newest(
        checkpointer, ckpt_lib.abstract_like(abstract_state, state_sharding),
        functools.partial(resume.check_same_run, architecture=architecture(config.model),
                          data_layout=data_layout, config=config, report=loop.report),
        strict=config.checkpoint.strict, workdir=workdir, report=loop.report)
    last_saved = None if restored is None else restored[2]
    if restored is None:
      state = state_lib.create_state(model, tx, jax.random.key(config.seed), state_sharding)
      loop.report(f'Initialised a new model ({state_lib.count_params(state["params"]):,} '
                  'parameters).')
      if config.init_from:
        imported = pretrained.import_weights(config.init_from, model, config.init_from_channels)
        state = {**state, 'params': pretrained.place(state['params'], imported,
                                                     state_sharding['params'])}
        loop.report(f'Imported the {imported.part} from {config.init_from}'
                    + ''.join(f'; {note}' for note in imported.notes) + '.')
    else:
      state, _, step = restored
      loop.report(f'Resumed from {checkpointer.directory}/{step}.')
    start_step = int(jax.device_get(state['step']))
    resume.record_start(workdir, config, start_step, writer)

    def step_fn(remat_policy):
      return jax.jit(
          functools.partial(pretrain_step.train_step, model=model.clone(remat_policy=remat_policy),
                            tx=tx, schedule=schedule, mean=mean, std=std, seed=config.seed,
                            accum_steps=config.optim.grad_accum_steps, storage=storage),
          in_shardings=(state_sharding, batch_sharding),
          out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=(0,))
    # Reconstructions run on every process (params are global arrays); process 0 writes them.
    recon_fn = jax.jit(functools.partial(reconstruct, model=model, mean=mean, std=std,
                                         seed=config.seed, storage=storage),
                       out_shardings=sharding.replicated(mesh))
    first_rows = jax.jit(lambda images: images[:config.num_images],
                         out_shardings=sharding.replicated(mesh))

    stop_step = config.total_steps
    if config.stop_at_step:
      stop_step = min(stop_step, config.stop_at_step)
    num_steps = max(stop_step - start_step, 0)
    if not num_steps:
      loop.report(f'Nothing to do: the checkpoint is at step {start_step}, the run stops at '
                  f'{stop_step}.')
    image_shape = (local_batch, dataset.tile_size, dataset.tile_size, dataset.num_channels)
    feed = faults.Feed(
        dataset.batches(local_batch, seed=config.seed, start_step=start_step,
                        num_steps=num_steps, shuffle_buffer=config.dataset.shuffle_buffer),
        lambda: {schema.IMAGE: storage.nodata(image_shape)}, stop_signal,
        skip_mode=config.dataset.max_bad_records > 0)

    flops_per_example = flops_lib.mae_train_flops(model)
    peak, peak_source = flops_lib.device_peak_flops(
        override_tflops=config.peak_tflops_per_device)
    throughput = loop.Throughput(config.batch_size, flops_per_example, peak, jax.device_count(),
                            config.total_steps)
    loop.report(f'{flops_per_example / 1e9:.3f} GFLOP per example per training step; device peak '
           + (f'{peak / 1e12:.3g} TFLOP/s ({peak_source})' if peak else 'unknown (no MFU; set '
              'config.peak_tflops_per_device)') + f'; {jax.device_count()} devices in '
           f'{jax.process_count()} process(es), mesh {dict(mesh.shape)}, {num_shards} data '
           f'shard(s); steps {start_step} -> {stop_step}.')

    # --- Loop -----------------------------------------------------------------------------------
    def compile_step(state, batch):
      t0 = time.perf_counter()
      limit = memory.device_memory_bytes()
      compiled, remat, planned = memory.compile_fitting(
          lambda policy: step_fn(policy).lower(state, batch).compile(),
          config.model.remat_policy, limit)
      loop.report(f'Compiled the train step in {time.perf_counter() - t0:.1f} s (remat {remat}'
             + (f'; XLA plans {planned / 1e9:.1f} GB per device' if planned else '')
             + (f' of {limit / 1e9:.1f} GB' if planned and limit else '') + ').')
      return compiled

    preview = []  # A few tiles of the first batch, reconstructed at image steps.

    def between_steps(state, done, batch):
      if not preview:
        preview.append(first_rows(batch[schema.IMAGE]))
      if done % config.image_every_steps == 0 or done == stop_step:
        images = recon_fn(state['params'], preview[0], done)
        if jax.process_index() == 0:
          write_reconstruction(writer, workdir, done, images)
      return state, {}

    end = loop.run_steps(
        state=state, compile_step=compile_step, feed=feed, batch_sharding=batch_sharding,
        start_step=start_step, stop_step=stop_step,
        prefetch_depth=config.dataset.device_prefetch,
        save_every=config.checkpoint.every_steps, log_every=config.log_every_steps,
        checkpointer=checkpointer, metadata=metadata, writer=writer, throughput=throughput,
        stop_signal=stop_signal, last_saved=last_saved, between_steps=between_steps)
    checkpointer.close()  # Waits until every save is committed.
    writer.close()
  last_metrics = dict(end.metrics)
  if end.stopped_by:
    loop.report(loop.stopped_message(end.stopped_by, end.last_saved, checkpointer.directory))
    last_metrics['stopped_by'] = end.stopped_by
  return last_metrics


def write_reconstruction(writer, workdir, step, images) -> None:
  original, masked, recon = (np.asarray(a) for a in images)
  figure = plots.reconstruction_figure(original, masked, recon)
  plot_dir = epath.Path(workdir) / 'plots'
  plot_dir.mkdir(parents=True, exist_ok=True)
  render.write_png(os.fspath(plot_dir / f'reconstruction_{step:07d}.png'), figure)
  writer.write_images(step, {'reconstruction': figure[None]})


def restore_state(config: ml_collections.ConfigDict, workdir: str, step: int | None = None):
  """Restores a pretraining state from ``workdir`` onto the mesh of ``config``.

  Returns (state, metadata). The mesh may differ from the one the checkpoint was saved on.
  """
  workdir = loop.resolve_workdir(workdir)
  if not epath.Path(ckpt_lib.checkpoint_dir(workdir)).exists():
    raise FileNotFoundError(f'no checkpoints folder in {workdir!r}: is it a mae_jax workdir?')
  mesh = sharding.create_mesh(config.mesh)
  rules = sharding.rules_from_config(config.logical_rules)
  model = mae.model_from_config(config.model)
  tx, _ = optim.create_optimizer(config.optim, config.batch_size, config.total_steps)
  checkpointer = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir), async_save=False)
  step = checkpointer.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {ckpt_lib.checkpoint_dir(workdir)}')
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract, shardings = state_lib.state_shardings(model, tx, mesh, rules)
    state, metadata = checkpointer.restore(step, ckpt_lib.abstract_like(abstract, shardings))
  checkpointer.close()
  return state, metadata
