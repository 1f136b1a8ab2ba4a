"""The pretraining step: a pure function of (state, global batch), jitted by its callers.

Kept apart from the trainer (``mae_jax.trainers.pretrain``) so benchmarks and accelerator images import the
step without the trainer's writers, checkpoints and TensorFlow-backed readers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from data_pipeline import quantise
from data_pipeline import schema
from mae_jax import faults
from mae_jax import preprocess


def step_key(seed: int, step: jax.Array) -> jax.Array:
  """The PRNG key of one step: independent of mesh, process count and restarts."""
  return jax.random.fold_in(jax.random.key(seed), step)


def loss_fn(params, model, patches, valid, noise):
  out = model.apply({'params': params}, patches, valid, noise, method=model.forward_patches)
  return out['loss']


def train_step(state, batch, *, model, tx, schedule, mean, std, seed, accum_steps,
               storage=quantise.FLOAT16):
  """One optimiser step on a global batch: decode, normalise, mask, forward, backward, update.

  ``storage``: the form the batch's images are stored in (``data_pipeline.quantise``).
  """
  step = state['step']
  patches, valid = preprocess.normalise_patches(batch[schema.IMAGE], model.patch_size, mean, std,
                                                storage)
  noise = jax.random.uniform(step_key(seed, step), (patches.shape[0], model.num_patches))
  grad_fn = jax.value_and_grad(loss_fn)
  if accum_steps == 1:
    loss, grads = grad_fn(state['params'], model, patches, valid, noise)
  else:
    # Strided micro-batches keep every micro-batch evenly split over the data axes.
    def micro(x):
      return x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)

    def body(carry, xs):
      loss_sum, grad_sum = carry
      loss, grads = grad_fn(state['params'], model, *xs)
      return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, state['params'])
    (loss, grads), _ = jax.lax.scan(body, (jnp.zeros(()), zeros),
                                    (micro(patches), micro(valid), micro(noise)))
    loss, grads = loss / accum_steps, jax.tree.map(lambda g: g / accum_steps, grads)
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  grad_norm = optax.tree.norm(grads)
  # A non-finite loss or gradient leaves params and optimiser state as they were, so the state
  # the trainer may still save is the last good one; the host stops on seeing `finite` false.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep_good = lambda new, old: jnp.where(finite, new, old)
  params = jax.tree.map(keep_good, params, state['params'])
  opt_state = jax.tree.map(keep_good, opt_state, state['opt_state'])
  metrics = {'loss': loss, 'grad_norm': grad_norm, 'lr': schedule(step), 'finite': finite,
             **faults.step_signals(batch)}
  return {'step': step + 1, 'params': params, 'opt_state': opt_state}, metrics
