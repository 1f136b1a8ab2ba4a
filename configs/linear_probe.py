r"""Linear probing (He et al.'s protocol): frozen encoder, BatchNorm without affine, one linear layer.

  python -m mae_jax.main --config configs/linear_probe.py:<preset>[,<task>] --workdir DIR \
      --config.init_checkpoint=PRETRAIN_WORKDIR

``<task>`` is ``vcf`` (default: the cls token -> percent tree cover) or ``worldcover`` (each patch
token -> 11 class logits, bilinearly upsampled). See configs/downstream.py for the fields.
"""

from configs import downstream


def get_config(arg: str = 'tiny'):
  preset, _, task = (arg or 'tiny').partition(',')
  return downstream.get_config(task or 'vcf', 'linear_probe', preset)
