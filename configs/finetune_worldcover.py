r"""Fine-tuning on ESA WorldCover (11-class segmentation, SETR-PUP head).

  python -m mae_jax.main --config configs/finetune_worldcover.py:preset=<preset>[,protocol=<protocol>] \
      --workdir DIR --config.init_checkpoint=PRETRAIN_WORKDIR [--config.label_fraction=0.01 --config.seed=1]

An empty init_checkpoint trains the same architecture from scratch (the baseline). Presets are the
pretraining presets (tiny, poster, mae_b, ...); protocols, defaults and fields are described in
configs/downstream.py. The tiny preset on the embedded dataset (make demo) runs 150 steps of
batch 32 in about a minute on 2 CPU cores.
"""

from configs import downstream


def get_config(arg: str = 'tiny'):
  return downstream.get_config(arg, task='worldcover')
