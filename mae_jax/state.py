"""The train state: a plain pytree created directly sharded on the mesh.

``{'step': int32, 'params': ..., 'opt_state': ...}``. Shardings come from the logical axis names
the model puts on its parameters (``jax.eval_shape`` of the init, no memory used), mapped by the
config's rules; the optimiser state mirrors its parameters (``optax.tree_map_params``). The
real state is then initialised by ``jax.jit(init, out_shardings=...)``, so no device ever holds
an unsharded copy. Randomness is not part of the state: keys derive from (seed, step).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mae_jax import sharding


def _dummy_inputs(model: nn.Module):
  shape = (1, model.image_size, model.image_size, model.num_channels)
  return (jnp.zeros(shape, jnp.float32), jnp.ones(shape, jnp.bool_),
          jnp.zeros((1, model.num_patches), jnp.float32))


def init_params_fn(model: nn.Module) -> Callable[[jax.Array], Any]:
  """rng -> boxed (logically partitioned) params."""
  def init(rng):
    return model.init(rng, *_dummy_inputs(model))['params']
  return init


def param_shardings(model: nn.Module, mesh: Mesh, rules) -> tuple[Any, Any]:
  """(abstract unboxed params, their NamedShardings) without allocating anything."""
  init = init_params_fn(model)
  specs = nn.get_partition_spec(jax.eval_shape(init, jax.random.key(0)))
  # Unboxing applies sharding constraints, so it happens inside a trace, not on abstract values.
  abstract = jax.eval_shape(lambda rng: nn.meta.unbox(init(rng)), jax.random.key(0))
  return abstract, sharding.logical_to_shardings(specs, mesh, rules)


def optimizer_shardings(tx: optax.GradientTransformation, abstract_params, params_sharding,
                        mesh: Mesh):
  """(abstract optimiser state, its shardings): per-param entries (moments) mirror their param's
  sharding, the rest (counts) is replicated."""
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_sharding = optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt, params_sharding,
      transform_non_params=lambda _: NamedSharding(mesh, P()),
      is_leaf=lambda x: isinstance(x, NamedSharding))
  return abstract_opt, opt_sharding


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, rules):
  """(abstract state, state shardings) for ``model`` and ``tx`` on ``mesh``."""
  abstract_params, params_sharding = param_shardings(model, mesh, rules)
  abstract_opt, opt_sharding = optimizer_shardings(tx, abstract_params, params_sharding, mesh)
  replicated = NamedSharding(mesh, P())
  abstract = {'step': jax.ShapeDtypeStruct((), jnp.int32), 'params': abstract_params,
              'opt_state': abstract_opt}
  shardings = {'step': replicated, 'params': params_sharding, 'opt_state': opt_sharding}
  return abstract, shardings


def create_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array, shardings):
  """Initialises params and optimiser state straight into ``shardings``."""
  def init(rng):
    params = nn.meta.unbox(init_params_fn(model)(rng))
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}
  return jax.jit(init, out_shardings=shardings)(rng)


def count_params(params: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
