"""The argument after a config file's colon: ``tiny`` or ``preset=tiny,protocol=mae,task=vcf``.

``python -m mae_jax.main --config configs/finetune_vcf.py:preset=mae_b,protocol=poster`` hands
``get_config`` the text after the colon. Every config file reads it here, so the same names mean
the same thing everywhere: only the first value may go without its name (it is the preset), and
every other value is named, so a second slot can never mean a protocol in one file and a task in
another.
"""

from __future__ import annotations

from typing import Sequence


def parse(arg: str | None, where: str, **choices: Sequence[str] | None) -> dict[str, str]:
  """Reads ``arg`` into {name: value} for the names in ``choices``.

  Args:
    arg: The text after the config file's colon; '' or None gives {}.
    where: The config file, named in errors.
    **choices: name -> its allowed values (None: any). The first name may be given bare.

  Raises:
    ValueError: an unknown name, a value outside its choices, a name given twice, or a bare
      value anywhere but first.
  """
  names = tuple(choices)
  parsed: dict[str, str] = {}
  for position, part in enumerate(p.strip() for p in (arg or '').split(',') if p.strip()):
    name, equals, value = part.partition('=')
    if not equals:
      if position:
        raise ValueError(f'{where}: {part!r} needs its name (name=value): only the first '
                         f'value, the {names[0]}, may go unnamed; names: {", ".join(names)}')
      name, value = names[0], part
    name, value = name.strip(), value.strip()
    if name not in choices:
      raise ValueError(f'{where}: unknown argument {name!r}; use {", ".join(names)}')
    if name in parsed:
      raise ValueError(f'{where}: {name} is given twice')
    allowed = choices[name]
    if allowed is not None and value not in allowed:
      raise ValueError(f'{where}: unknown {name} {value!r}; use one of {", ".join(allowed)}')
    parsed[name] = value
  return parsed
