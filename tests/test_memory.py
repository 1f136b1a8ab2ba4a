"""remat_policy='auto': the fastest policy whose compiled step fits, by XLA's own memory plan."""

import functools

import jax
import jax.numpy as jnp
import pytest

from mae_jax import memory
from mae_jax.models import mae

pytestmark = pytest.mark.integration


@functools.lru_cache(maxsize=None)
def compiled_grad_step(policy):
  """The compiled value-and-grad of a small scanned MAE's loss with ``policy``."""
  model = mae.MaskedAutoencoder(image_size=64, patch_size=4, num_channels=4, width=64, depth=4,
                                heads=4, mlp_dim=256, decoder_width=32, decoder_depth=2,
                                decoder_heads=2, decoder_mlp_dim=128, remat_policy=policy,
                                scan_layers=True)
  images = jax.ShapeDtypeStruct((16, 64, 64, 4), jnp.float32)
  valid = jax.ShapeDtypeStruct(images.shape, jnp.bool_)
  noise = jax.ShapeDtypeStruct((16, model.num_patches), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), images, valid, noise)

  def loss(params, images, valid, noise):
    return model.apply(params, images, valid, noise)['loss']
  return jax.jit(jax.value_and_grad(loss)).lower(params, images, valid, noise).compile()


def test_auto_takes_the_first_policy_that_fits_and_says_when_none_does():
  plans = {p: memory.planned_bytes(compiled_grad_step(p)) for p in memory.REMAT_SEARCH}
  # Remat saves memory: each policy of the search plans less than the one before.
  assert plans['none'] > plans['dots'] > plans['full'] > 0, plans
  tried = []

  def compile_with(policy):
    tried.append(policy)
    return compiled_grad_step(policy)

  # Room for 'dots' but not for 'none' (a limit between their plans, over the headroom).
  limit = int((plans['none'] + plans['dots']) / 2 / memory.PLAN_HEADROOM)
  _, policy, planned = memory.compile_fitting(compile_with, 'auto', limit)
  assert (policy, planned, tried) == ('dots', plans['dots'], ['none', 'dots'])
  tried.clear()
  _, policy, _ = memory.compile_fitting(compile_with, 'auto', None)  # No limit known (CPUs).
  assert (policy, tried) == ('none', ['none'])
  tried.clear()
  _, policy, _ = memory.compile_fitting(compile_with, 'full', 1)  # A named policy is kept.
  assert (policy, tried) == ('full', ['full'])
  with pytest.raises(MemoryError, match=r"remat_policy='auto': the step does not fit .*\("
                     r"none: .* GB; dots: .* GB; full: .* GB.*config\.mesh\.fsdp"):
    memory.compile_fitting(compile_with, 'auto', plans['full'] // 2)


def test_planned_bytes_counts_donated_arguments_once():
  x = jnp.zeros((1024, 256), jnp.float32)  # 1 MiB
  plain = jax.jit(lambda a: a * 2).lower(x).compile()
  donated = jax.jit(lambda a: a * 2, donate_argnums=0).lower(x).compile()
  assert memory.planned_bytes(plain) >= 2 * x.nbytes
  assert memory.planned_bytes(donated) < memory.planned_bytes(plain)
