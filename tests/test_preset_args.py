"""The argument after a config file's colon: named values, one meaning per name in every file."""

import pytest

from configs import downstream
from configs import finetune_vcf
from configs import finetune_worldcover
from configs import linear_probe
from configs import preset_args
from configs import pretrain
from configs import study


def test_parse_reads_a_bare_first_value_and_named_ones():
  choices = dict(preset=('tiny', 'mae_b'), protocol=('poster', 'mae'), task=None)
  assert preset_args.parse('tiny', 'f.py', **choices) == {'preset': 'tiny'}
  assert preset_args.parse(' mae_b , protocol=poster,task=x ', 'f.py', **choices) == {
      'preset': 'mae_b', 'protocol': 'poster', 'task': 'x'}
  assert preset_args.parse('protocol=mae', 'f.py', **choices) == {'protocol': 'mae'}
  assert preset_args.parse('', 'f.py', **choices) == {}
  assert preset_args.parse(None, 'f.py', **choices) == {}


@pytest.mark.parametrize('arg, message', [
    ('tiny,poster', "'poster' needs its name"),
    ('preset=tiny,colour=red', "unknown argument 'colour'"),
    ('preset=huge', "unknown preset 'huge'"),
    ('tiny,preset=mae_b', 'preset is given twice'),
])
def test_parse_refuses_what_it_cannot_read_and_names_the_file(arg, message):
  with pytest.raises(ValueError, match=message) as error:
    preset_args.parse(arg, 'configs/x.py', preset=('tiny', 'mae_b'), protocol=('poster', 'mae'))
  assert str(error.value).startswith('configs/x.py: ')


def test_the_same_name_means_the_same_thing_in_every_config_file():
  assert pretrain.get_config('preset=mae_s').model.encoder.width == 384
  assert pretrain.get_config('mae_s').to_dict() == pretrain.get_config('preset=mae_s').to_dict()
  vcf = finetune_vcf.get_config('preset=mae_b,protocol=poster')
  assert (vcf.task_name, vcf.protocol, vcf.model.encoder.width) == ('vcf', 'poster', 768)
  assert finetune_vcf.get_config('mae_b').protocol == 'mae'  # The mae_* presets' default.
  assert finetune_worldcover.get_config('protocol=mae').task_name == 'worldcover'
  probe = linear_probe.get_config('preset=tiny,task=worldcover')
  assert (probe.task_name, probe.protocol, probe.freeze_encoder) == ('worldcover', 'linear_probe',
                                                                      True)
  assert linear_probe.get_config('').task_name == 'vcf'
  assert study.get_config('preset=full').pretrain_preset == 'poster'


def test_a_name_a_file_does_not_take_is_refused():
  with pytest.raises(ValueError, match="finetune_vcf.py: unknown argument 'task'"):
    finetune_vcf.get_config('preset=tiny,task=worldcover')
  with pytest.raises(ValueError, match="linear_probe.py: unknown argument 'protocol'"):
    linear_probe.get_config('protocol=mae')


def test_build_matches_the_file_it_stands_behind():
  assert (downstream.build('worldcover', 'finetune', 'tiny', 'mae').to_dict()
          == finetune_worldcover.get_config('preset=tiny,protocol=mae').to_dict())
