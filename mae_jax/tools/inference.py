"""Loads a fine-tuned (or linear-probed) downstream model from its checkpoint, ready to predict.

One loader for every consumer of a trained head: offline evaluation (``mae_jax.trainers.evaluate``) and
whole-scene prediction (``mae_jax.tools.predict``). The model, head, task and input contract come from
the checkpoint's own metadata, so nothing about the run has to be repeated; the weights are
restored straight onto this machine's mesh (any device count; the saving run's mesh does not
matter), params and BatchNorm statistics only, never the optimiser state.

:func:`save_initialised` writes freshly initialised weights in the same checkpoint format, so
benchmarks and smoke tests can run the whole inference path at any model size untrained.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh

from data_pipeline import schema
from mae_jax import checkpoint as ckpt_lib
from mae_jax import sharding
from mae_jax.models import downstream

# The data-parallel mesh over every local device: what inference wants unless a model is too
# large to replicate (then pass a mesh config with fsdp / tensor > 1).
DEFAULT_MESH = dict(data=-1, fsdp=1, tensor=1, num_devices=0, dcn_data=1, dcn_fsdp=1,
                    dcn_tensor=1)


@dataclasses.dataclass(frozen=True)
class Downstream:
  """A restored downstream model and what it needs to run."""
  model: downstream.DownstreamModel  # The evaluation clone (train=False).
  variables: dict[str, Any]  # {'params', 'batch_stats'} on ``mesh``.
  contract: schema.InputContract
  config: ml_collections.ConfigDict  # The fine-tuning run's config (mesh replaced).
  mesh: Mesh
  rules: tuple[tuple[str, Any], ...]  # Logical-axis rules: apply the model under them.
  task: str  # 'vcf' or 'worldcover'.
  step: int
  checkpoint: str  # '<checkpoints folder>/<step>'.
  weights: str  # 'best' (the step selected on validation loss) or 'last'.
  metadata: dict[str, Any] = dataclasses.field(repr=False, default_factory=dict)


def variable_targets(model: downstream.DownstreamModel, mesh: Mesh, rules) -> dict[str, Any]:
  """Restore targets (ShapeDtypeStructs with this mesh's shardings) of params and batch_stats.

  The same shapes and shardings as those leaves of ``finetune.state_shardings``, computed here
  without importing the training stack (TensorFlow and the metric writers cost seconds and
  hundreds of MB that prediction does not need). Nothing is allocated.
  """
  init = downstream.init_variables_fn(model)
  key = jax.random.key(0)
  specs = nn.get_partition_spec(jax.eval_shape(init, key))
  abstract = jax.eval_shape(lambda r: nn.meta.unbox(init(r)), key)
  shardings = sharding.logical_to_shardings(specs, mesh, rules)
  return {k: ckpt_lib.abstract_like(abstract.get(k, {}), shardings.get(k, {}))
          for k in ('params', 'batch_stats')}


def read_finetune_metadata(checkpoint_path: str) -> tuple[str, int, dict[str, Any]]:
  """(checkpoints folder, step, metadata) of a fine-tuning checkpoint; nothing else is read.

  Raises:
    FileNotFoundError: No such path or no committed step there (naming it).
    ValueError: A pretraining checkpoint (it has no head).
  """
  directory, step = ckpt_lib.locate(checkpoint_path)
  metadata = ckpt_lib.read_metadata(directory, step)
  if metadata.get('task') != 'finetune':
    raise ValueError(f'{directory}/{step} is a {metadata.get("task")!r} checkpoint: prediction '
                     'and offline evaluation need a fine-tuning or linear-probing one (a '
                     'pretraining checkpoint has no head; fine-tune it first)')
  return directory, step, metadata


def load_downstream(checkpoint_path: str, mesh_config: Any = None,
                    use_best: bool = True) -> Downstream:
  """Rebuilds and restores the downstream model of a fine-tuning checkpoint.

  Args:
    checkpoint_path: A fine-tuning workdir (its latest step), its ``checkpoints`` folder or one
      ``checkpoints/<step>`` folder.
    mesh_config: ``config.mesh``-style sizes (a dict or ConfigDict) of the mesh to restore onto;
      None = data-parallel over every device (:data:`DEFAULT_MESH`).
    use_best: Restore the step selected on validation loss when the run kept one
      (``select_best``), else the last step's weights.

  Returns:
    A :class:`Downstream`.
  """
  directory, step, metadata = read_finetune_metadata(checkpoint_path)
  config = ml_collections.ConfigDict(metadata['config'])
  if hasattr(mesh_config, 'to_dict'):
    mesh_config = mesh_config.to_dict()
  config.mesh = ml_collections.ConfigDict({**DEFAULT_MESH, **(mesh_config or {})})
  # The attention implementation is this machine's choice (the run may have forced cuDNN on a
  # GPU), not part of the model.
  config.model.attention_implementation = 'auto'
  mesh = sharding.create_mesh(config.mesh)
  rules = sharding.rules_from_config(config.logical_rules)
  model = downstream.model_from_config(config, train=False)
  contract = schema.InputContract.from_dict(metadata['input_contract'])
  source = 'best' if use_best and config.get('select_best', True) else None
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    wanted = variable_targets(model, mesh, rules)
    restored = ckpt_lib.restore_subtree(directory, step, {source: wanted} if source else wanted)
  variables = restored[source] if source else restored
  return Downstream(model=model, variables=variables, contract=contract, config=config,
                    mesh=mesh, rules=rules, task=config.task_name, step=step,
                    checkpoint=f'{directory}/{step}', weights=source or 'last',
                    metadata=metadata)


def save_initialised(config: ml_collections.ConfigDict, workdir: str,
                     contract: schema.InputContract, seed: int = 0) -> str:
  """Writes freshly initialised weights of a fine-tuning ``config`` as step 0 of ``workdir`` in
  the fine-tuning checkpoint format (params, batch_stats and the same as 'best'; no optimiser
  state), so that :func:`load_downstream` accepts it. For benchmarks and smoke tests of the
  inference path at model sizes nobody has trained yet; returns the step's folder."""
  import json  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if not contract.mean or not contract.std:
    raise ValueError('the input contract needs per-channel mean and std (normalisation)')
  mesh = sharding.create_mesh(config.mesh)
  rules = sharding.rules_from_config(config.logical_rules)
  model = downstream.model_from_config(config, train=False)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shardings = jax.tree.map(lambda t: t.sharding, variable_targets(model, mesh, rules))
    init_fn = lambda r: nn.meta.unbox(downstream.init_variables_fn(model)(r))
    collections = jax.eval_shape(init_fn, jax.random.key(seed))  # Maybe no batch_stats.
    variables = jax.jit(init_fn, out_shardings={k: shardings[k] for k in collections})(
        jax.random.key(seed))
  params, stats = variables['params'], variables.get('batch_stats', {})
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'batch_stats': stats,
           'best': {'params': params, 'batch_stats': stats,
                    'loss': jnp.full((), jnp.inf, jnp.float32), 'step': jnp.zeros((), jnp.int32)}}
  metadata = {'task': 'finetune', 'task_name': config.task_name, 'head_kind': config.head.kind,
              'model': config.model.to_dict(), 'input_contract': contract.to_dict(),
              'init_checkpoint': None, 'label_fraction': None, 'initialised_only': True,
              'config': json.loads(config.to_json_best_effort())}
  checkpointer = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir), async_save=False)
  try:
    checkpointer.save(0, state, metadata, force=True)
  finally:
    checkpointer.close()
  return f'{ckpt_lib.checkpoint_dir(workdir)}/0'
