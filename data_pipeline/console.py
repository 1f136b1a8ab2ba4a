"""Console commands (setup.py's entry points) that behave as ``python -m <module>`` does.

A console script's ``__main__`` is a generated wrapper, so absl's ``--help`` would show neither
the module's docstring nor its flags (only ``--helpfull`` would list them, among every
library's). :func:`run` hands them to the wrapper first. Here, below both ``data_pipeline`` and
``mae_jax``, so that the commands of both use it.
"""

from __future__ import annotations

import sys
from typing import Callable

from absl import app
from absl import flags


def run(main: Callable[[list[str]], None], module_name: str) -> None:
  """``app.run(main)``, with ``--help`` giving ``module_name``'s docstring and flags."""
  if module_name != '__main__':  # python -m: absl already knows the module as the main one.
    for flag in flags.FLAGS.get_key_flags_for_module(module_name):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    sys.modules['__main__'].__doc__ = sys.modules[module_name].__doc__
  app.run(main)
