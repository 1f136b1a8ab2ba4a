"""The downstream heads: shapes, parameter trees, numerics and batch-sharded BatchNorm."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from data_pipeline import schema
from mae_jax.models import heads

WIDTH = 32


def tokens_for(batch, image_size, patch_size, width=WIDTH, seed=0):
  """Random encoder-like tokens (B, 1 + L, D) for an image_size / patch_size grid."""
  length = 1 + (image_size // patch_size)**2
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(batch, length, width)).astype(np.float32))


def init(head, tokens):
  """Unboxed variables of ``head`` for ``tokens``."""
  return nn.meta.unbox(head.init(jax.random.key(0), tokens, train=False))


def train_apply(head, variables, tokens):
  return head.apply(variables, tokens, train=True, mutable=['batch_stats'])


def param_shapes(variables, collection='params'):
  flat = jax.tree_util.tree_flatten_with_path(variables.get(collection, {}))[0]
  return {'/'.join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def bilinear_matrix(size_in, size_out):
  """(size_out, size_in) weights of PyTorch's bilinear upsampling with align_corners=False."""
  weights = np.zeros((size_out, size_in))
  for i in range(size_out):
    src = min(max((i + 0.5) * size_in / size_out - 0.5, 0.0), size_in - 1)
    lo = int(np.floor(src))
    hi = min(lo + 1, size_in - 1)
    weights[i, lo] += 1.0 - (src - lo)
    weights[i, hi] += src - lo
  return weights


# --- Shapes ------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def setr_448():
  """SETR-PUP on the 28 x 28 grid of 448 px / patch 16 (the issue's case), built once."""
  tokens = tokens_for(2, 448, 16)
  head = heads.SetrPupHead(channels=16, image_size=448)
  variables = init(head, tokens)
  logits, _ = jax.jit(lambda v, t: train_apply(head, v, t))(variables, tokens)
  return head, variables, logits


def test_setr_pup_448_gives_full_resolution_raw_logits(setr_448):
  head, _, logits = setr_448
  assert logits.shape == (2, 448, 448, schema.NUM_CLASSES) == (2, 448, 448, 11)
  assert logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  assert head.stages_for(28) == 4
  # No activation on the logits: both signs occur.
  assert float(logits.min()) < 0 < float(logits.max())


def test_setr_pup_448_param_tree(setr_448):
  _, variables, _ = setr_448
  # Four 3x3 conv + BN stages (28 -> 448) and one 1x1 classifier.
  expected = {'classifier/kernel': (1, 1, 16, schema.NUM_CLASSES),
              'classifier/bias': (schema.NUM_CLASSES,)}
  for i in range(4):
    expected[f'conv_{i}/kernel'] = (3, 3, WIDTH if i == 0 else 16, 16)
    expected[f'conv_{i}/bias'] = (16,)
    expected[f'bn_{i}/scale'] = (16,)
    expected[f'bn_{i}/bias'] = (16,)
  assert param_shapes(variables) == expected
  assert param_shapes(variables, 'batch_stats') == {
      f'bn_{i}/{s}': (16,) for i in range(4) for s in ('mean', 'var')}


@pytest.mark.parametrize('image_size,patch_size,num_stages,expected_stages', [
    (128, 16, None, 4),  # 8 x 8 grid -> 128, no final resize
    (96, 16, 2, 2),  # 6 x 6 grid -> 24, then a bilinear resize to 96
    (96, 12, None, 3),  # patch 12 is not a power of two: 8 -> 64, then a resize to 96
])
def test_setr_pup_other_grids(image_size, patch_size, num_stages, expected_stages):
  tokens = tokens_for(2, image_size, patch_size)
  head = heads.SetrPupHead(channels=16, num_stages=num_stages, image_size=image_size)
  variables = init(head, tokens)
  logits, _ = train_apply(head, variables, tokens)
  assert logits.shape == (2, image_size, image_size, schema.NUM_CLASSES)
  assert logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  assert head.stages_for(image_size // patch_size) == expected_stages
  convs = [k for k in variables['params'] if k.startswith('conv_')]
  assert len(convs) == expected_stages


def test_setr_pup_rejects_bad_grids():
  head = heads.SetrPupHead(channels=8, image_size=128)
  with pytest.raises(ValueError, match='do not form a square grid'):
    init(head, jnp.zeros((1, 1 + 60, WIDTH)))
  with pytest.raises(ValueError, match='beyond image_size 128'):
    init(heads.SetrPupHead(channels=8, num_stages=5, image_size=128), tokens_for(1, 128, 16))


def test_vcf_head_shape_and_range():
  tokens = tokens_for(3, 448, 16)
  head = heads.VcfHead()
  variables = init(head, tokens)
  shapes = param_shapes(variables)
  # The authors' sizes at 448 px / patch 16: 785 -> 196 tokens, D -> D // 4, 512, 256, 128, 1.
  assert shapes == {
      'token_conv/kernel': (785, 196), 'token_conv/bias': (196,),
      'width_conv/kernel': (WIDTH, WIDTH // 4), 'width_conv/bias': (WIDTH // 4,),
      'fc_0/kernel': (196 * WIDTH // 4, 512), 'fc_0/bias': (512,),
      'fc_1/kernel': (512, 256), 'fc_1/bias': (256,),
      'fc_2/kernel': (256, 128), 'fc_2/bias': (128,),
      'out/kernel': (128, 1), 'out/bias': (1,)}
  for scale in (1.0, 1e4, -1e4):
    out = head.apply(variables, scale * tokens, train=True)
    assert out.shape == (3,) and out.dtype == jnp.float32
    assert np.all((np.asarray(out) >= 0) & (np.asarray(out) <= 100))


@pytest.mark.parametrize('task,image_size,patch_size', [
    ('vcf', 448, 16), ('vcf', 128, 16), ('worldcover', 448, 16), ('worldcover', 128, 16),
    ('worldcover', 96, 16)])
def test_linear_probe_shapes(task, image_size, patch_size):
  tokens = tokens_for(2, image_size, patch_size)
  head = heads.LinearProbeHead(task=task, image_size=image_size)
  out, _ = train_apply(head, init(head, tokens), tokens)
  if task == 'vcf':
    assert out.shape == (2,)
  else:
    assert out.shape == (2, image_size, image_size, schema.NUM_CLASSES)
  assert out.dtype == jnp.float32


# --- Linear probe BatchNorm --------------------------------------------------------------------


@pytest.mark.parametrize('task', heads.TASKS)
def test_linear_probe_batch_norm_has_no_affine_parameters(task):
  tokens = tokens_for(4, 64, 16)
  head = heads.LinearProbeHead(task=task, image_size=64)
  variables = init(head, tokens)
  outputs = 1 if task == 'vcf' else schema.NUM_CLASSES
  # The only parameters are the linear layer's; the BatchNorm has statistics only.
  assert param_shapes(variables) == {'head/kernel': (WIDTH, outputs), 'head/bias': (outputs,)}
  assert param_shapes(variables, 'batch_stats') == {'bn/mean': (WIDTH,), 'bn/var': (WIDTH,)}


@pytest.mark.parametrize('task', heads.TASKS)
def test_linear_probe_standardises_with_batch_then_running_statistics(task):
  # Features with a clear offset and scale, so standardisation is visible.
  tokens = 3.0 + 5.0 * tokens_for(16, 64, 16, seed=1)
  head = heads.LinearProbeHead(task=task, image_size=64)
  variables = init(head, tokens)
  _, state = head.apply(variables, tokens, train=True, mutable=['batch_stats'],
                        capture_intermediates=lambda m, _: m.name == 'bn')
  normed = np.asarray(state['intermediates']['bn']['__call__'][0]).reshape(-1, WIDTH)
  np.testing.assert_allclose(normed.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(normed.var(0), 1.0, atol=1e-4)

  feats = np.asarray(tokens[:, 0] if task == 'vcf' else tokens[:, 1:]).reshape(-1, WIDTH)
  feats = feats.astype(np.float64)
  mean = 0.1 * feats.mean(0)  # momentum 0.9 from the initial zeros / ones
  var = 0.9 + 0.1 * feats.var(0)
  stats = state['batch_stats']['bn']
  np.testing.assert_allclose(stats['mean'], mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats['var'], var, rtol=1e-5)

  # Eval mode: the running statistics, then the linear layer.
  variables = {'params': variables['params'], 'batch_stats': state['batch_stats']}
  out = np.asarray(head.apply(variables, tokens, train=False))
  kernel = np.asarray(variables['params']['head']['kernel'], np.float64)
  bias = np.asarray(variables['params']['head']['bias'], np.float64)
  linear = (feats - mean) / np.sqrt(var + heads.BN_EPSILON) @ kernel + bias
  if task == 'vcf':  # The layer predicts a fraction; the head reports percent.
    np.testing.assert_allclose(out, 100.0 * linear[:, 0], rtol=1e-5, atol=1e-4)
  else:
    grid = linear.reshape(16, 4, 4, -1)
    up = bilinear_matrix(4, 64)
    np.testing.assert_allclose(out, np.einsum('hi,wj,bijc->bhwc', up, up, grid), rtol=1e-5,
                               atol=1e-5)


def test_linear_probe_vcf_output_is_linear_and_unbounded():
  tokens = tokens_for(8, 64, 16)
  head = heads.LinearProbeHead(task='vcf', image_size=64)
  variables = init(head, tokens)
  variables['params']['head']['bias'] = jnp.asarray([5.0])  # a fraction: 500 %
  out = head.apply(variables, tokens, train=False)
  assert float(out.max()) > 100.0  # no sigmoid: values leave [0, 100]


# --- VcfHead numerics --------------------------------------------------------------------------


def test_vcf_head_matches_numpy():
  tokens = tokens_for(4, 128, 16, seed=2)  # 65 tokens
  head = heads.VcfHead(num_tokens_out=12, width_out=6, hidden=(20, 10, 7))
  variables = init(head, tokens)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables['params'])
  x = np.asarray(tokens, np.float64)
  x = np.einsum('btd,to->bod', x, p['token_conv']['kernel']) + p['token_conv']['bias'][:, None]
  x = x @ p['width_conv']['kernel'] + p['width_conv']['bias']  # (B, 12, 6)
  x = x.reshape(4, -1)  # token-major flatten
  for i in range(3):
    x = np.maximum(x @ p[f'fc_{i}']['kernel'] + p[f'fc_{i}']['bias'], 0.0)
  z = (x @ p['out']['kernel'] + p['out']['bias'])[:, 0]
  expected = 100.0 / (1.0 + np.exp(-z))
  out = np.asarray(head.apply(variables, tokens, train=False))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  # The default init puts the prediction near 50 %; check there is some spread anyway.
  assert np.ptp(out) > 0


# --- Factory and logical axes ------------------------------------------------------------------


def test_create_head():
  assert isinstance(heads.create_head('finetune', 'vcf', hidden=(8,)), heads.VcfHead)
  assert isinstance(heads.create_head('finetune', 'worldcover'), heads.SetrPupHead)
  probe = heads.create_head('linear_probe', 'worldcover', image_size=64)
  assert isinstance(probe, heads.LinearProbeHead) and probe.task == 'worldcover'
  with pytest.raises(ValueError, match=r"kind must be one of \('finetune', 'linear_probe'\)"):
    heads.create_head('mlp', 'vcf')
  with pytest.raises(ValueError, match=r"task must be one of \('vcf', 'worldcover'\)"):
    heads.create_head('finetune', 'landcover')


@pytest.mark.parametrize('kind,task', [(k, t) for k in heads.HEAD_KINDS for t in heads.TASKS])
def test_every_parameter_has_valid_logical_axes(kind, task):
  from configs import pretrain  # pylint: disable=g-import-not-at-top
  kwargs = {'linear_probe': {'image_size': 64}, 'finetune': {}}[kind]
  if (kind, task) == ('finetune', 'worldcover'):
    kwargs = {'channels': 8, 'image_size': 64}
  if (kind, task) == ('finetune', 'vcf'):
    kwargs = {'hidden': (8, 4)}
  head = heads.create_head(kind, task, **kwargs)
  tokens = tokens_for(2, 64, 16)
  boxed = jax.eval_shape(lambda: head.init(jax.random.key(0), tokens, train=False))['params']
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(leaf, nn.Partitioned) for leaf in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim
    named = [n for n in leaf.names if n is not None]
    assert len(named) == len(set(named)) and set(named) <= {'embed', 'mlp'}
  # The default rules map them onto a (data, fsdp, tensor) mesh without reusing a mesh axis.
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ('data', 'fsdp', 'tensor'))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh,
                                          pretrain.DEFAULT_LOGICAL_RULES)
  assert all(isinstance(s, NamedSharding) for s in jax.tree.leaves(shardings))


# --- Batch-sharded execution -------------------------------------------------------------------


@pytest.mark.parametrize('kind,task', [(k, t) for k in heads.HEAD_KINDS for t in heads.TASKS])
def test_sharded_jit_matches_unsharded(kind, task):
  kwargs = {'image_size': 64}
  if (kind, task) == ('finetune', 'worldcover'):
    kwargs = {'channels': 8, 'image_size': 64}
  if (kind, task) == ('finetune', 'vcf'):
    kwargs = {'hidden': (16, 8)}
  head = heads.create_head(kind, task, **kwargs)
  # Two examples per device with different offsets: per-device BatchNorm statistics would differ
  # from the global ones.
  tokens = tokens_for(16, 64, 16, seed=3) + jnp.arange(16.0)[:, None, None]
  variables = init(head, tokens)

  def step(variables, tokens):
    out, state = head.apply(variables, tokens, train=True, mutable=['batch_stats'])
    return out, state, head.apply(variables, tokens, train=False)

  expected = jax.jit(step)(variables, tokens)
  mesh = Mesh(np.array(jax.devices()), ('batch',))
  assert mesh.size == 8
  sharded_tokens = jax.device_put(tokens, NamedSharding(mesh, P('batch')))
  replicated = jax.device_put(variables, NamedSharding(mesh, P()))
  got = jax.jit(step)(replicated, sharded_tokens)
  assert got[0].sharding.spec[0] == 'batch'  # computed batch-parallel
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-5)


def test_linear_probe_mean_pool_equals_cls_probe_on_the_mean_token():
  tokens = tokens_for(8, 64, 16)
  mean_head = heads.LinearProbeHead(task='vcf', image_size=64, pool='mean')
  cls_head = heads.LinearProbeHead(task='vcf', image_size=64, pool='cls')
  variables = init(cls_head, tokens)
  # Put the mean of the patch tokens where the cls token is: the cls probe must then agree.
  pooled = tokens.at[:, 0].set(tokens[:, 1:].mean(axis=1))
  for train in (False, True):
    a = mean_head.apply(variables, tokens, train=train, mutable=['batch_stats'])[0]
    b = cls_head.apply(variables, pooled, train=train, mutable=['batch_stats'])[0]
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5)
  with pytest.raises(ValueError, match='pool'):
    heads.LinearProbeHead(task='vcf', pool='max').init(jax.random.key(0), tokens, train=False)
