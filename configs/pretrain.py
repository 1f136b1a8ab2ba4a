r"""MAE pretraining on Sentinel-1 tiles: the presets, their commands and their costs.

Run (the embedded dataset is built by ``make demo`` or ``python -m data_pipeline.build_synthetic``):

  python -m mae_jax.main --config configs/pretrain.py:tiny --workdir /tmp/mae_tiny \
      [--config.total_steps=300 --config.batch_size=32 --config.seed=0 --config.mesh.fsdp=2]

Presets (448 px, patch 16, 28 x 28 patches unless said; model FLOPs per preset and measured
throughput are in bench/README.md, what a pod must read and what a run costs in docs/scaling.md):
  * ``tiny``: 128 px tiles (8 x 8 patches), ViT width 128 x 4 blocks, 2 x 64 decoder, raw
    targets: the CPU demo and tests (300 steps of batch 32 on 2 CPU cores: ``make demo``).
  * ``poster``: the poster authors' released setup. ViT-B/16, one 512-wide decoder block
    (16 heads), learned position embeddings, raw z-scored targets, AdamW 1.5e-4 constant,
    (0.9, 0.999), wd 0.01, no warmup; batch 8 per device; 75 epochs of ~450 K tiles.
  * ``mae_ti`` / ``mae_s`` / ``mae_b`` / ``mae_l`` / ``mae_h``: He et al.'s recipe at 448 px:
    sin-cos embeddings, 8 x 512 decoder, per-patch normalised targets, AdamW (0.9, 0.95), lr
    1.5e-4 x batch / 256, 40-epoch warmup then cosine, wd 0.05, batch 4096, 800 epochs. Set
    ``--config.mesh.fsdp`` so params and optimiser state fit (ViT-H: fsdp >= 8 on 32 GB chips);
    L and H scan their layers and remat only where the step would not fit otherwise.
"""

import ml_collections

from configs import preset_args

PRESETS = ('tiny', 'poster', 'mae_ti', 'mae_s', 'mae_b', 'mae_l', 'mae_h')
ENCODERS = {  # name: (width, depth, heads, mlp_dim)
    'Ti': (192, 12, 3, 768), 'S': (384, 12, 6, 1536), 'B': (768, 12, 12, 3072),
    'L': (1024, 24, 16, 4096), 'H': (1280, 32, 16, 5120),
}

DEFAULT_LOGICAL_RULES = (
    # Parameters.
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
    ('patch', None),
    ('layers', None),
    # Activations.
    ('batch', ('data', 'fsdp')),
    ('seq', None),
    ('act_embed', None),
    ('act_mlp', 'tensor'),
    ('act_heads', 'tensor'),
)


def encoder(name: str) -> ml_collections.ConfigDict:
  width, depth, heads, mlp_dim = ENCODERS[name]
  return ml_collections.ConfigDict(dict(width=width, depth=depth, heads=heads, mlp_dim=mlp_dim))


def base_config() -> ml_collections.ConfigDict:
  """He et al.'s MAE recipe with a ViT-B/16 on 448 px, 12-channel tiles."""
  c = ml_collections.ConfigDict()
  c.task = 'pretrain'
  c.seed = 0
  c.total_steps = 100_000
  # Stop (with a checkpoint) at this step although total_steps is larger: time-boxed jobs and
  # resume tests; the schedule still follows total_steps. 0 = off.
  c.stop_at_step = 0
  c.batch_size = 4096  # Global, over all processes.
  # Start from MAE weights published in PyTorch (mae_jax.pretrained): an official MAE .pth, a
  # transformers ViT-MAE folder or .safetensors file, or a `python -m mae_jax.tools.export` folder.
  # Read only when the workdir has no checkpoint yet; '' = random initialisation.
  c.init_from = ''
  # How a 3-channel (RGB) patch embedding becomes config.model.num_channels: 'mean' or
  # 'repeat' (the rules are in mae_jax/pretrained.py).
  c.init_from_channels = 'mean'

  c.dataset = ml_collections.ConfigDict()
  c.dataset.data_dir = ''  # A folder written by data_pipeline (tfds.builder_from_directory).
  c.dataset.train_split = 'train'
  # Regions (data_pipeline.schema.REGIONS) to pretrain on; () = every tile of the split. The
  # label-efficiency study pretrains on schema.PRETRAIN_REGIONS and tests outside them too.
  c.dataset.regions = ()
  # > 1: shuffle. The local and URL readers shuffle whole epochs; the tf.data one
  # (dataset.reader='tf') shuffles in a window of this many raw records per host (~4.8 MB each
  # at 448 px).
  # Batches read and copied to the devices ahead of the step, on a thread, so the copy (308 MB
  # for 64 tiles at 448 px) overlaps the step; 0 = read each batch when its step starts.
  c.dataset.device_prefetch = 2
  c.dataset.shuffle_buffer = 256
  # Parts the split is cut into, each read by one process and shuffled on its own; a global
  # batch takes batch_size / data_shards examples from each (data_pipeline.data_shards). 0 = one
  # per process. A fixed number (a multiple of every host count you may use) keeps the data
  # order the same on any number of hosts, so a job can resume on another topology exactly.
  c.dataset.data_shards = 0
  # Check each record's payload CRC the first time this process reads it (tf.data checks on
  # every read). Costs ~6x the read time of a 448 px tile in the first epoch, nothing later.
  c.dataset.verify_checksums = True
  # 0: a bad record (corrupt, wrong shape, in a truncated or missing file) stops training with
  # the file and record. N > 0: up to N are skipped (read as no-data), counted and logged.
  c.dataset.max_bad_records = 0
  # 'auto': local files with os reads, URLs (gs://) through tf.io.gfile, both in one data order
  # (a run moves between a local disk and cloud storage and resumes exactly). 'tf': the tf.data
  # reader, only to resume a run started on a URL before that, in its order.
  c.dataset.reader = 'auto'
  # Keep this host's training records in memory after their first read, so later epochs read
  # no storage (same batches): 'off', 'auto' (URLs only, within half the memory available),
  # 'on' (any files, within 0.8 of it) or a byte budget per process such as '200G'. The
  # size is printed at start-up (data_pipeline.host_cache).
  c.dataset.host_cache = 'auto'
  # A resume refuses to change the data order (other data_shards, reader, seed or batch) unless
  # this is set.
  c.dataset.allow_new_data_order = False

  c.model = ml_collections.ConfigDict()
  c.model.image_size = 448
  c.model.patch_size = 16
  c.model.num_channels = 12
  c.model.encoder = encoder('B')
  c.model.decoder = ml_collections.ConfigDict(dict(width=512, depth=8, heads=16, mlp_dim=2048))
  c.model.pos_embedding = 'sincos'
  c.model.mask_ratio = 0.75
  c.model.norm_pix_loss = 'patch'  # 'none' | 'patch' | 'patch_channel'
  c.model.layer_norm_eps = 1e-6
  c.model.dtype = 'bfloat16'  # Compute dtype; params and optimiser state stay float32.
  # 'none' | 'full' | 'dots' | 'save_dots', or 'auto': the fastest of none, dots, full whose
  # compiled step fits the device's memory by XLA's own plan (mae_jax.memory).
  c.model.remat_policy = 'none'
  c.model.scan_layers = False
  # 'auto': cuDNN flash attention on NVIDIA GPUs (bfloat16), XLA's on TPUs, the einsum form on
  # CPUs; or force 'cudnn', 'xla' or 'einsum' (mae_jax.models.vit.resolve_attention).
  c.model.attention_implementation = 'auto'

  c.optim = ml_collections.ConfigDict()
  c.optim.schedule = 'warmup_cosine'
  c.optim.base_lr = 1.5e-4
  c.optim.scale_lr_by_batch = True  # lr = base_lr x batch_size / 256
  c.optim.warmup_steps = 5_000
  c.optim.end_lr = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.05
  c.optim.grad_clip_norm = 0.0  # 0 = off
  c.optim.grad_accum_steps = 1

  # num_devices 0 = all devices; a smaller number uses the first ones (tests, debugging).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, num_devices=0,
                                          dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
  c.logical_rules = DEFAULT_LOGICAL_RULES

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1_000
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True
  # A resume whose newest step cannot be read or fails its checksums falls back to the newest
  # step that verifies (moving the damaged one to <workdir>/damaged_checkpoints/); True refuses.
  c.checkpoint.strict = False
  # Comma-separated fields a resume may change although they change what is optimised or the
  # optimiser state (mae_jax.trainers.resume.GUARDED), e.g. 'total_steps,optim.base_lr'.
  c.allow_changes = ''

  c.log_every_steps = 50
  c.image_every_steps = 5_000
  c.num_images = 4
  c.peak_tflops_per_device = 0.0  # 0: look the device up in mae_jax.flops.PEAK_FLOPS.
  return c


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  """``configs/pretrain.py:<preset>`` or ``:preset=<preset>``."""
  return preset_config(preset_args.parse(arg, 'configs/pretrain.py', preset=PRESETS)
                       .get('preset', 'tiny'))


def preset_config(preset: str) -> ml_collections.ConfigDict:
  """The config of one preset (``PRESETS``)."""
  c = base_config()
  if preset == 'tiny':
    c.total_steps = 300
    c.batch_size = 32
    c.dataset.data_dir = 'data/synthetic_tiny'
    c.dataset.shuffle_buffer = 512
    c.dataset.data_shards = 8  # Same data order on 1, 2, 4 or 8 processes.
    c.model.image_size = 128
    c.model.encoder = ml_collections.ConfigDict(dict(width=128, depth=4, heads=4, mlp_dim=512))
    c.model.decoder = ml_collections.ConfigDict(dict(width=64, depth=2, heads=4, mlp_dim=256))
    c.model.dtype = 'float32'
    # Raw z-scored targets: within a 16 px patch most variance of a speckled SAR tile is
    # speckle, so per-patch normalised targets are mostly unpredictable noise for a model this
    # small (the loss stalls near 0.85); the poster's authors trained without norm-pix too.
    c.model.norm_pix_loss = 'none'
    c.optim.base_lr = 1.5e-3 * 256 / 32  # Peak lr 1.5e-3 at batch 32: small models like more.
    c.optim.warmup_steps = 20
    c.checkpoint.every_steps = 100
    c.checkpoint.keep = 2
    c.log_every_steps = 20
    c.image_every_steps = 100
  elif preset == 'poster':
    c.total_steps = 4_200_000 // 32  # 75 epochs of ~450 K tiles at batch 256 (8 per device).
    c.batch_size = 256
    c.model.pos_embedding = 'learned'
    c.model.decoder = ml_collections.ConfigDict(dict(width=512, depth=1, heads=16, mlp_dim=2048))
    c.model.norm_pix_loss = 'none'
    c.optim.schedule = 'constant'
    c.optim.base_lr = 1.5e-4
    c.optim.scale_lr_by_batch = False
    c.optim.warmup_steps = 0
    c.optim.b2 = 0.999
    c.optim.weight_decay = 0.01
  elif preset.startswith('mae_'):
    c.model.encoder = encoder({'ti': 'Ti'}.get(preset[4:], preset[4:].upper()))
    c.total_steps = 800 * 450_000 // 4096
    c.optim.warmup_steps = 40 * 450_000 // 4096
    if preset != 'mae_b':
      c.model.remat_policy = 'auto'  # Remat only where the step would not fit without.
      c.model.scan_layers = True
    if preset == 'mae_h':
      c.mesh.fsdp = 8
  else:
    raise ValueError(f'unknown preset {preset!r}: use one of {", ".join(PRESETS)}')
  return c
