"""What every command-line program of mae_jax does first (mae_jax.main, mae_jax.trainers.study)."""

from __future__ import annotations

from absl import app
from absl import flags
from absl import logging

from mae_jax import distributed


def start_process(argv) -> None:
  """Rejects stray arguments, joins a multi-process job if asked, configures TensorFlow for
  host-only input and quiets library logs."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  distributed.initialize()
  # Imported here so --help stays fast and TensorFlow is configured before any use.
  from data_pipeline import input as data_input  # pylint: disable=g-import-not-at-top
  data_input.configure_tensorflow()
  if not flags.FLAGS['verbosity'].present:
    # Orbax and TFDS log every save and read at INFO; keep stdout for our progress lines.
    logging.set_verbosity(logging.WARNING)
