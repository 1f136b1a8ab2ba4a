"""Checksums of a sharded pytree, computed where the arrays live: a checkpoint proves itself.

Each leaf gets two 32-bit sums of its raw bits, each bit pattern weighted by an odd number drawn
from the element's position. Integer sums wrap modulo 2**32 whatever order XLA adds in, so the
result is exact and the same on any mesh, device count or backend; it needs one pass over the
state on the devices and no copy to the host. A single changed element always changes the first
sum (an odd weight is invertible modulo 2**32); several changes cancelling in both sums by
chance is a 1 in 2**64 event. Orbax (0.12) checks no payload checksums of its own, which is why
a checkpoint with flipped bytes used to restore without a word.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Multipliers from the golden ratio and MurmurHash3's finaliser: any odd constants would do.
_WEIGHT_A = np.uint32(0x9E3779B1)
_WEIGHT_B = np.uint32(0x85EBCA77)
_SALT_B = np.uint32(0x5BD1E995)


def _words(leaf: jax.Array) -> jax.Array:
  """The leaf's raw bits as uint32, one per element (two per element for 8-byte dtypes)."""
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  if leaf.dtype == jnp.bool_:
    leaf = leaf.astype(jnp.uint8)
  size = jnp.dtype(leaf.dtype).itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(leaf, jnp.uint32)
  if size == 8:  # bitcast adds a trailing axis of two words.
    return jax.lax.bitcast_convert_type(leaf, jnp.uint32)
  small = {2: jnp.uint16, 1: jnp.uint8}[size]
  return jax.lax.bitcast_convert_type(leaf, small).astype(jnp.uint32)


def _position(shape: tuple[int, ...]) -> jax.Array:
  """Each element's row-major index (mod 2**32), built per axis so sharding is untouched."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride % 2**32)
    stride *= shape[axis]
  return index


def _leaf_sums(leaf: jax.Array) -> jax.Array:
  words = _words(leaf)
  position = _position(words.shape)
  weight_a = position * _WEIGHT_A | np.uint32(1)
  weight_b = (position ^ _SALT_B) * _WEIGHT_B | np.uint32(1)
  rotated = (words << np.uint32(16)) | (words >> np.uint32(16))
  return jnp.stack([jnp.sum(words * weight_a, dtype=jnp.uint32),
                    jnp.sum(rotated * weight_b, dtype=jnp.uint32)])


@jax.jit
def _all_sums(leaves: list[jax.Array]) -> list[jax.Array]:
  return [_leaf_sums(leaf) for leaf in leaves]


def fingerprints(tree: Any) -> dict[str, list[int]]:
  """{leaf path (``jax.tree_util.keystr``): [sum a, sum b]} of ``tree``'s arrays.

  Runs on the arrays' devices; every process of a multi-process job gets the same values.
  """
  paths_and_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  if not paths_and_leaves:
    return {}
  sums = [_read(s) for s in _all_sums([leaf for _, leaf in paths_and_leaves])]
  return {jax.tree_util.keystr(path): [int(v) for v in s]
          for (path, _), s in zip(paths_and_leaves, sums)}


def _read(sums: jax.Array) -> np.ndarray:
  """Two uint32 of a global computation, on any process."""
  if sums.is_fully_replicated:
    return np.asarray(sums.addressable_data(0))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(sums, tiled=True))


def mismatches(tree: Any, expected: dict[str, list[int]]) -> list[str]:
  """Leaf paths of ``tree`` whose fingerprints differ from ``expected`` (a saved record).

  Leaves ``expected`` has no record of are not checked (a sub-tree may be verified against the
  record of the whole).
  """
  actual = fingerprints(tree)
  return [path for path, sums in actual.items()
          if path in expected and list(expected[path]) != sums]
