r"""Linear probing (He et al.'s protocol): frozen encoder, BatchNorm without affine, one linear layer.

  python -m mae_jax.main --config configs/linear_probe.py:preset=<preset>[,task=<task>] \
      --workdir DIR --config.init_checkpoint=PRETRAIN_WORKDIR

``<task>`` is ``vcf`` (default: the cls token -> tree-cover fraction x 100 = percent;
``--config.head.options.pool=mean`` uses the mean patch token) or ``worldcover`` (each patch token
-> 11 class logits, bilinearly upsampled). See configs/downstream.py for the fields. The tiny
preset runs 300 steps of batch 32 (peak lr 1e-2) in about 45 s on 2 CPU cores.
"""

from configs import downstream


def get_config(arg: str = 'tiny'):
  return downstream.get_config(arg, head_kind='linear_probe')
