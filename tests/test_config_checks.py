"""Bad configuration gets an error that names the field."""

import pytest

from mae_jax import sharding
from mae_jax.trainers import pretrain
from mae_jax import validate


def test_patch_size_that_does_not_divide_the_image(tiny_config, tmp_path):
  tiny_config.model.patch_size = 12
  with pytest.raises(validate.ConfigError,
                     match=r'config\.model\.patch_size=12 does not divide config\.model\.image_size=32'):
    pretrain.train_and_evaluate(tiny_config, str(tmp_path))


@pytest.mark.parametrize('ratio', [0.0, 1.0, 1.5, -0.1])
def test_mask_ratio_outside_the_open_interval(tiny_config, tmp_path, ratio):
  tiny_config.model.mask_ratio = ratio
  with pytest.raises(validate.ConfigError, match=r'config\.model\.mask_ratio=.* must lie in \(0, 1\)'):
    pretrain.train_and_evaluate(tiny_config, str(tmp_path))


def test_batch_not_divisible_by_data_parallel_size(tiny_config, tmp_path):
  tiny_config.batch_size = 12  # 8 devices on the data axis.
  with pytest.raises(validate.ConfigError,
                     match=r'config\.batch_size=12 .* not divisible by the data-parallel size 8'):
    pretrain.train_and_evaluate(tiny_config, str(tmp_path))


def test_channel_count_that_differs_from_the_data(tiny_config, tmp_path):
  tiny_config.model.num_channels = 3
  with pytest.raises(validate.ConfigError,
                     match=r'config\.model\.num_channels=3 but the dataset at .* has 12 channels'):
    pretrain.train_and_evaluate(tiny_config, str(tmp_path))


def test_tile_size_that_differs_from_the_data(tiny_config, tmp_path):
  tiny_config.model.image_size = 64
  with pytest.raises(validate.ConfigError, match=r'config\.model\.image_size=64 but the dataset'):
    pretrain.train_and_evaluate(tiny_config, str(tmp_path))


def test_heads_that_do_not_divide_the_width(tiny_config, tmp_path):
  tiny_config.model.encoder.heads = 3
  with pytest.raises(validate.ConfigError, match=r'config\.model\.encoder\.width=32 is not divisible by config\.model\.encoder\.heads=3'):
    pretrain.train_and_evaluate(tiny_config, str(tmp_path))


def test_an_attention_implementation_that_cannot_run_here(tiny_config, tmp_path):
  tiny_config.model.attention_implementation = 'cudnn'  # These CPUs have no cuDNN.
  with pytest.raises(validate.ConfigError,
                     match=r"config\.model\.attention_implementation='cudnn' cannot run here: it "
                     r"needs an NVIDIA GPU .* use 'auto' .*encoder: head dim 16"):
    pretrain.train_and_evaluate(tiny_config, str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists()
  tiny_config.model.attention_implementation = 'flash'
  with pytest.raises(validate.ConfigError, match=r'attention_implementation must be one of'):
    pretrain.train_and_evaluate(tiny_config, str(tmp_path))


def test_missing_dataset_names_the_path(tiny_config, tmp_path):
  tiny_config.dataset.data_dir = str(tmp_path / 'absent')
  with pytest.raises(FileNotFoundError, match='absent'):
    pretrain.train_and_evaluate(tiny_config, str(tmp_path / 'wd'))


@pytest.mark.parametrize('sizes, message', [
    (dict(data=3, fsdp=1, tensor=1), r'config\.mesh .* uses 3 devices but 8 are available'),
    (dict(data=-1, fsdp=3, tensor=1), r'8 is not divisible by 3'),
    (dict(data=-1, fsdp=-1, tensor=1), r'at most one axis may be -1'),
    (dict(data=0, fsdp=1, tensor=1), r'config\.mesh\.data must be a positive size or -1'),
])
def test_mesh_sizes(sizes, message):
  with pytest.raises(ValueError, match=message):
    sharding.resolve_axis_sizes(sizes, 8)


def test_mesh_fills_the_free_axis():
  assert sharding.resolve_axis_sizes(dict(data=-1, fsdp=2, tensor=2), 8) == [2, 2, 2]


@pytest.mark.parametrize('field, value, message', [
    ('optim.base_lr', -1e-3, r'config\.optim\.base_lr=-0\.001 must be a finite number > 0'),
    ('optim.base_lr', float('nan'), r'config\.optim\.base_lr=nan must be a finite number > 0'),
    ('optim.base_lr', 0.0, r'config\.optim\.base_lr=0\.0 must be a finite number > 0'),
    ('optim.b2', 1.0, r'config\.optim\.b2=1\.0 must be in \[0, 1\)'),
    ('checkpoint.every_steps', 0, r'config\.checkpoint\.every_steps=0 must be a whole number >= 1'),
    ('checkpoint.keep', 0, r'config\.checkpoint\.keep=0 .* delete every save'),
    ('image_every_steps', 0, r'config\.image_every_steps=0 must be a whole number >= 1'),
    ('log_every_steps', 0, r'config\.log_every_steps=0 must be a whole number >= 1'),
])
def test_values_that_train_the_wrong_thing_or_crash_later_are_refused(tiny_config, tmp_path,
                                                                       field, value, message):
  section, _, name = field.rpartition('.')
  (tiny_config[section] if section else tiny_config)[name] = value
  with pytest.raises(validate.ConfigError, match=message):
    pretrain.train_and_evaluate(tiny_config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()  # Refused before anything was written.


@pytest.mark.parametrize('field, value', [('optim.layer_decay', 0.0), ('optim.warmup_epochs', -1.0),
                                          ('eval_every_steps', -1), ('optim.base_lr', float('inf'))])
def test_fine_tuning_values_are_checked_too(field, value):
  from configs import finetune_vcf  # pylint: disable=g-import-not-at-top
  config = finetune_vcf.get_config('tiny')
  validate.check_training(config)
  section, _, name = field.rpartition('.')
  (config[section] if section else config)[name] = value
  with pytest.raises(validate.ConfigError, match=rf'config\.{field}='):
    validate.check_training(config)
