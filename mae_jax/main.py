r"""Entrypoint: ``python -m mae_jax.main --config configs/<file>.py:<preset> --workdir DIR``.

``config.task`` picks the job: ``pretrain`` (configs/pretrain.py), ``finetune``
(configs/finetune_vcf.py, finetune_worldcover.py, linear_probe.py) or ``evaluate``
(configs/evaluate.py; its --workdir defaults to the checkpoint's).

Any config field can be overridden with ``--config.<field>=<value>`` (for example
``--config.total_steps=1000 --config.mesh.fsdp=4``). A run started again with the same workdir
resumes from the workdir's latest checkpoint.
"""

from __future__ import annotations

from absl import app
from absl import flags
from ml_collections import config_flags

from mae_jax import cli
from mae_jax import distributed

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file[:preset].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory (local or gs://) for checkpoints, '
                               'logs and plots; reused to resume.')
flags.mark_flags_as_required(['config'])


def main(argv):
  cli.start_process(argv)
  with distributed.exit_on_error():
    run(_CONFIG.value, _WORKDIR.value)


def run(config, workdir) -> None:
  task = config.task
  if task != 'evaluate' and not workdir:
    raise app.UsageError('--workdir is required (evaluation alone defaults to the checkpoint\'s)')
  if task == 'pretrain':
    from mae_jax.trainers import pretrain  # pylint: disable=g-import-not-at-top
    pretrain.train_and_evaluate(config, workdir)
  elif task == 'finetune':
    from mae_jax.trainers import finetune  # pylint: disable=g-import-not-at-top
    finetune.finetune(config, workdir)
  elif task == 'evaluate':
    from mae_jax.trainers import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.evaluate_checkpoint(config, workdir)
  else:
    raise app.UsageError(f'unknown config.task {task!r}')


def console_main() -> None:
  """The ``mae-jax-train`` command (setup.py's console script)."""
  from data_pipeline import console  # pylint: disable=g-import-not-at-top
  console.run(main, __name__)


if __name__ == '__main__':
  console_main()
