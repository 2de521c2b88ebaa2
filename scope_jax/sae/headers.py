"""What an SAE file declares, checked before anything is allocated for it.

A `.npz` member's header and a safetensors header each declare every array's dtype and shape; a
damaged or hostile file can declare a shape of terabytes. These checks set each declaration
against the bytes the file really holds and raise a ValueError naming the file, the array and the
declared shape, so that no reader ever allocates what the file cannot fill.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
from pathlib import Path

import numpy as np

# deflate expands at most ~1032:1, so a member whose declared size is beyond this is not deflate data
_MAX_DEFLATE_RATIO = 1100
SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}
SAFETENSORS_ITEMSIZE |= {"U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


def check_npz(path: Path, members: list[str]) -> None:
  """Each of `members` (array names, without `.npy`) holds the bytes its npy header declares."""
  with zipfile.ZipFile(path) as z:
    for name in members:
      info = z.getinfo(f"{name}.npy")
      if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
        raise ValueError(f"{path}: array {name} declares {info.file_size:,} bytes but stores {info.compress_size:,}")
      if info.compress_size * _MAX_DEFLATE_RATIO < info.file_size:
        raise ValueError(
          f"{path}: array {name} declares {info.file_size:,} bytes, more than its {info.compress_size:,} "
          "compressed bytes can hold"
        )
      with z.open(info) as member:
        try:
          version = np.lib.format.read_magic(member)
          read_header = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
          )
          shape, _, dtype = read_header(member)
        except (ValueError, OSError) as e:
          raise ValueError(f"{path}: array {name} has no valid npy header ({e})") from e
        header = member.tell()
      if dtype.hasobject or dtype.kind not in "fiub":
        raise ValueError(f"{path}: array {name} has dtype {dtype}; expected numbers")
      declared = math.prod(shape) * dtype.itemsize
      if declared != info.file_size - header:
        raise ValueError(
          f"{path}: array {name} declares shape {shape} of {dtype} ({declared:,} bytes), but the file holds "
          f"{info.file_size - header:,} bytes for it"
        )


def check_safetensors(path: Path) -> None:
  """The header is readable and each tensor's dtype × shape is exactly its byte range in the file."""
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ValueError(f"{path}: {size} bytes; too short for a safetensors file")
    (n,) = struct.unpack("<Q", head)
    if n > min(size - 8, _MAX_HEADER):
      raise ValueError(f"{path}: header declares {n:,} bytes; the file holds {size:,}")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{path}: the safetensors header is not valid JSON ({e})") from e
  if not isinstance(header, dict):
    raise ValueError(f"{path}: the safetensors header is not a JSON object")
  data = size - 8 - n
  for name, t in header.items():
    if name == "__metadata__":
      continue
    dtype, shape, offsets = (t.get(k) if isinstance(t, dict) else None for k in ("dtype", "shape", "data_offsets"))
    if dtype not in SAFETENSORS_ITEMSIZE or not _ints(shape) or not _ints(offsets) or len(offsets) != 2:
      raise ValueError(f"{path}: tensor {name} is declared as {t!r}; expected dtype, shape and data_offsets")
    declared = math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]
    begin, end = offsets
    if not 0 <= begin <= end <= data or end - begin != declared:
      raise ValueError(
        f"{path}: tensor {name} declares shape {tuple(shape)} of {dtype} ({declared:,} bytes) at bytes "
        f"[{begin:,}, {end:,}); the file holds {data:,} bytes of tensor data"
      )


def _ints(value) -> bool:
  return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
