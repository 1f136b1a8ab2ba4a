"""The one place that turns dB images into their stored form and back.

A dataset stores its images in the form its :class:`schema.InputContract` names
(``storage_dtype``; ``schema.STORAGE_DTYPES``):

* ``float16``: dB values clipped to the contract's ``clip_range``, NaN = no-data;
* ``uint8``: codes. 0 = no-data; 1..255 evenly spaced over the channel's ``[code_min,
  code_max]`` dB (``schema.UINT8_RANGE_DB``), values outside clipped to the ends first (and to
  ``clip_range``, which holds the code ranges), rounded to the nearest code. Half the bytes of
  float16, for an error of at most half a step (``StorageForm.max_error``).

:meth:`StorageForm.encode` runs on the host when a tile is written (``data_pipeline.writer``) and
when a scene window or an array is prepared for prediction (``mae_jax.tools``), so both see the
same values. :meth:`StorageForm.decode` runs on the device inside the jitted steps
(``mae_jax.preprocess``, with ``xp=jax.numpy``): the host keeps the compact form in its batches
and never converts. Host code that needs dB (statistics, pictures) calls the same decode with
numpy.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from data_pipeline import schema


@dataclasses.dataclass(frozen=True)
class StorageForm:
  """How one dataset stores its images; hashable, so jitted functions can close over it."""
  dtype: str = schema.STORAGE_DTYPE
  clip_range: tuple[float, float] = schema.CLIP_RANGE_DB
  code_min: tuple[float, ...] = ()  # uint8: dB of code 1, per channel
  code_max: tuple[float, ...] = ()  # uint8: dB of code 255, per channel

  @classmethod
  def of(cls, contract: schema.InputContract) -> 'StorageForm':
    return cls(contract.storage_dtype, tuple(contract.clip_range), tuple(contract.code_min),
               tuple(contract.code_max))

  @property
  def np_dtype(self) -> np.dtype:
    return np.dtype(self.dtype)

  @property
  def is_codes(self) -> bool:
    return self.dtype == schema.UINT8

  def _low_high(self) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel range of codes 1..255 within clip_range, float64."""
    low = np.maximum(np.asarray(self.code_min, np.float64), self.clip_range[0])
    high = np.minimum(np.asarray(self.code_max, np.float64), self.clip_range[1])
    return low, high

  @property
  def low(self) -> np.ndarray:
    """dB of code 1 per channel, float64 (uint8 only; what encode and decode use)."""
    return self._low_high()[0]

  @property
  def high(self) -> np.ndarray:
    """dB of code 255 per channel, float64 (uint8 only)."""
    return self._low_high()[1]

  @property
  def step(self) -> np.ndarray:
    """dB between neighbouring codes, per channel (uint8 only)."""
    if not self.is_codes:
      raise ValueError(f'{self.dtype} storage has no code step')
    low, high = self._low_high()
    return (high - low) / schema.UINT8_CODES

  def max_error(self, num_channels: int) -> np.ndarray:
    """The largest |decode(encode(x)) - x| in dB for x inside the stored range, per channel:
    half a code step (uint8), half a float16 spacing at the largest |value| (float16)."""
    if self.is_codes:
      return self.step / 2
    largest = max(abs(v) for v in self.clip_range)
    return np.full(num_channels, float(np.spacing(np.float16(largest))) / 2)

  def channel(self, index: int) -> 'StorageForm':
    """The form of channel ``index`` alone (its own code range), to encode one band."""
    if not self.is_codes:
      return self
    return dataclasses.replace(self, code_min=self.code_min[index:index + 1],
                               code_max=self.code_max[index:index + 1])

  def _check_channels(self, channels: int) -> None:
    if self.is_codes and channels != len(self.code_min):
      raise ValueError(f'the image has {channels} channels, the uint8 storage form '
                       f'{len(self.code_min)} code ranges')

  def encode(self, image_db: np.ndarray) -> np.ndarray:
    """dB image (..., C), NaN = no-data, -> its stored form (numpy; the host side)."""
    image_db = np.asarray(image_db)
    if image_db.dtype.kind != 'f':
      raise ValueError(f'encode takes floating-point dB values, not {image_db.dtype}')
    if not self.is_codes:
      return np.clip(image_db, *self.clip_range).astype(self.np_dtype)
    self._check_channels(image_db.shape[-1])
    low, high = self._low_high()
    values = np.clip(image_db.astype(np.float64), low, high)
    codes = np.rint((values - low) / self.step) + 1.0
    return np.where(np.isnan(values), schema.UINT8_NODATA_CODE, codes).astype(np.uint8)

  def decode(self, stored: Any, xp: Any = np) -> Any:
    """Stored image (..., C) -> float32 dB, NaN = no-data. ``xp``: numpy (host) or jax.numpy
    (inside a jitted step, where it fuses with the normalisation)."""
    kind = np.dtype(stored.dtype).kind
    if not self.is_codes:
      if kind != 'f':
        raise ValueError(f'images of dtype {np.dtype(stored.dtype).name} for a dataset stored as '
                         f'{self.dtype} dB: decode them with their own dataset\'s storage form')
      return stored.astype(xp.float32)
    if np.dtype(stored.dtype) != np.uint8:
      raise ValueError(f'images of dtype {np.dtype(stored.dtype).name} for a dataset stored as '
                       'uint8 codes: decode them with their own dataset\'s storage form')
    self._check_channels(stored.shape[-1])
    low, _ = self._low_high()
    low = xp.asarray(low.astype(np.float32))
    step = xp.asarray(self.step.astype(np.float32))
    values = low + (stored.astype(xp.float32) - 1.0) * step
    return xp.where(stored == schema.UINT8_NODATA_CODE, xp.float32(np.nan), values)

  def valid(self, stored: np.ndarray) -> np.ndarray:
    """Which stored values are data (not no-data), without decoding (numpy)."""
    if self.is_codes:
      return np.asarray(stored) != schema.UINT8_NODATA_CODE
    return np.isfinite(stored)

  def round_trip(self, image_db: np.ndarray) -> np.ndarray:
    """float32 dB as a model sees ``image_db`` once stored: decode(encode(x))."""
    return self.decode(self.encode(image_db))

  def nodata(self, shape: tuple[int, ...]) -> np.ndarray:
    """An all-no-data image of ``shape`` in the stored form (NaN, or code 0)."""
    if self.is_codes:
      return np.full(shape, schema.UINT8_NODATA_CODE, np.uint8)
    return np.full(shape, np.nan, self.np_dtype)


def form_of(contract: schema.InputContract) -> StorageForm:
  """The storage form of a dataset or checkpoint's contract."""
  return StorageForm.of(contract)


FLOAT16 = StorageForm()  # The default form (and that of datasets made before uint8 existed).
