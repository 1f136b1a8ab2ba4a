"""A Cloud Optimized GeoTIFF check read from the file's bytes, for tests.

The checks of GDAL's ``validate_cloud_optimized_geotiff.py`` (what ``rio cogeo validate``
also checks), done here with ``struct`` because neither GDAL's Python bindings nor rio-cogeo is
installed: GDAL's structural-metadata ghost header right after the TIFF header, the main IFD
right after it, every image tiled, overviews when the image is larger than one 512 px block, the
IFDs in order (full resolution, then overviews from largest to smallest) and all before any
tile data, the data of each smaller overview before the next larger one's (the full resolution
last), and the tiles of each level in row-major order.
"""

from __future__ import annotations

import struct

NEW_SUBFILE_TYPE, WIDTH, HEIGHT = 254, 256, 257
TILE_WIDTH, TILE_HEIGHT, TILE_OFFSETS, TILE_BYTE_COUNTS = 322, 323, 324, 325
# TIFF field types: (struct code, size).
TYPES = {1: ('B', 1), 2: ('c', 1), 3: ('H', 2), 4: ('I', 4), 5: ('II', 8), 6: ('b', 1),
         7: ('B', 1), 8: ('h', 2), 9: ('i', 4), 10: ('ii', 8), 11: ('f', 4), 12: ('d', 8),
         16: ('Q', 8), 17: ('q', 8), 18: ('Q', 8)}


def read_ifds(data: bytes) -> tuple[list[dict[str, object]], int]:
  """(one dict per IFD: its offset and the tags named above, header size) of a TIFF."""
  order = {b'II': '<', b'MM': '>'}.get(data[:2])
  if order is None:
    raise ValueError('not a TIFF (no II/MM byte order mark)')
  magic = struct.unpack(order + 'H', data[2:4])[0]
  if magic == 42:
    big, header = False, 8
    offset = struct.unpack(order + 'I', data[4:8])[0]
  elif magic == 43:
    big, header = True, 16
    offset = struct.unpack(order + 'Q', data[8:16])[0]
  else:
    raise ValueError(f'not a TIFF (magic {magic})')
  count_fmt, entry_size, offset_fmt = ('Q', 20, 'Q') if big else ('H', 12, 'I')
  inline = 8 if big else 4
  ifds = []
  while offset:
    (count,) = struct.unpack_from(order + count_fmt, data, offset)
    start = offset + struct.calcsize(count_fmt)
    tags: dict[int, tuple[int, ...]] = {}
    for i in range(count):
      entry = start + i * entry_size
      tag, kind = struct.unpack_from(order + 'HH', data, entry)
      (n,) = struct.unpack_from(order + ('Q' if big else 'I'), data, entry + 4)
      value_at = entry + (12 if big else 8)
      if tag not in (NEW_SUBFILE_TYPE, WIDTH, HEIGHT, TILE_WIDTH, TILE_HEIGHT, TILE_OFFSETS,
                     TILE_BYTE_COUNTS):
        continue
      code, size = TYPES[kind]
      if n * size > inline:
        (value_at,) = struct.unpack_from(order + offset_fmt, data, value_at)
      tags[tag] = struct.unpack_from(order + code * n, data, value_at)
    ifds.append({'offset': offset, 'tags': tags})
    (offset,) = struct.unpack_from(order + offset_fmt, data, start + count * entry_size)
  return ifds, header


def cog_errors(path: str) -> list[str]:
  """What keeps ``path`` from being a valid COG; empty if it is one."""
  with open(path, 'rb') as f:
    data = f.read()
  errors = []
  ifds, header = read_ifds(data)
  ghost = b'GDAL_STRUCTURAL_METADATA_SIZE='
  expected_ifd = header
  text = ''
  if data[header:header + len(ghost)] != ghost:
    errors.append('no GDAL structural metadata (ghost header) after the TIFF header')
  else:
    size = int(data[header + len(ghost):header + len(ghost) + 6])
    # "GDAL_STRUCTURAL_METADATA_SIZE=XXXXXX bytes\n" is 43 bytes, then `size` bytes.
    text = data[header:header + 43 + size].decode('latin-1')
    for item in ('LAYOUT=IFDS_BEFORE_DATA', 'BLOCK_ORDER=ROW_MAJOR'):
      if item not in text:
        errors.append(f'ghost header lacks {item}')
    if 'KNOWN_INCOMPATIBLE_EDITION=YES' in text:
      errors.append('KNOWN_INCOMPATIBLE_EDITION=YES: edited after it was written')
    expected_ifd = header + 43 + size
    expected_ifd += expected_ifd % 2  # An IFD starts on a word boundary.
  if ifds[0]['offset'] != expected_ifd:
    errors.append(f'main IFD at {ifds[0]["offset"]}, not right after the header at '
                  f'{expected_ifd}')
  images = [ifd for ifd in ifds if not ifd['tags'].get(NEW_SUBFILE_TYPE, (0,))[0] & 4]  # masks
  untiled = [f'image {i} (0 = full resolution) is not tiled' for i, ifd in enumerate(images)
             if TILE_OFFSETS not in ifd['tags'] or TILE_WIDTH not in ifd['tags']]
  if untiled:
    return errors + untiled
  main = images[0]['tags']
  width, height = main[WIDTH][0], main[HEIGHT][0]
  overviews = images[1:]
  if max(width, height) > 512 and not overviews:
    errors.append(f'{width} x {height} px without overviews')
  for i in range(1, len(images)):
    previous, current = images[i - 1], images[i]
    if current['offset'] < previous['offset']:
      errors.append(f'the IFD of overview {i} lies before that of the level above it')
    if current['tags'][WIDTH][0] >= previous['tags'][WIDTH][0]:
      errors.append(f'overview {i} is not smaller than the level above it')
  first_data = min(o for ifd in ifds for o in ifd['tags'][TILE_OFFSETS] if o)
  if max(ifd['offset'] for ifd in ifds) > first_data:
    errors.append('an IFD lies after tile data')
  spans = []
  leader = 'BLOCK_LEADER=SIZE_AS_UINT4' in text
  trailer = 'BLOCK_TRAILER=LAST_4_BYTES_REPEATED' in text
  for i, ifd in enumerate(images):
    pairs = [(o, n) for o, n in zip(ifd['tags'][TILE_OFFSETS], ifd['tags'][TILE_BYTE_COUNTS])
             if o]  # Offset 0: an empty (sparse) tile.
    offsets = [o for o, _ in pairs]
    if offsets != sorted(offsets):
      errors.append(f'the tiles of image {i} are not in row-major order')
    for offset, count in pairs:  # The ghost header's promises about every tile.
      if leader and struct.unpack_from('<I', data, offset - 4)[0] != count:
        errors.append(f'image {i}: a tile at {offset} lacks its size leader')
        break
      if trailer and count >= 4 and (data[offset + count - 4:offset + count]
                                     != data[offset + count:offset + count + 4]):
        errors.append(f'image {i}: a tile at {offset} lacks its repeated trailer')
        break
    if offsets:
      spans.append((i, min(offsets), max(offsets)))
  for (i, start, _), (j, _, end) in zip(spans, spans[1:]):
    if end > start:  # Image j (smaller) must lie wholly before image i.
      errors.append(f'the data of overview {j} lie after data of image {i}')
  return errors
