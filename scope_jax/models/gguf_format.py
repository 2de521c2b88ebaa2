"""GGUF's container (llama.cpp, versions 2 and 3, little-endian): the metadata and the tensor table.

gguf-py's `GGUFReader` builds a numpy view per element of every metadata array, so opening the
embedded Gemma 3 270M (a 262,144-entry vocabulary: tokens, scores and types) took 10 s of its
11 s load, and every stage that loads the model paid it again. Here a numeric array is one
`np.frombuffer` and a string array one loop over lengths, 0.3 s in all. Tensors are views of the
memory-mapped file in the layout `gguf.quants.dequantize` takes (which stays gguf-py's).
tests/models/test_gemma3.py checks every field and tensor against `GGUFReader` on the real file.

Layout: "GGUF", u32 version, u64 tensor count, u64 metadata count; each metadata entry a
string key, a u32 type and its value (a string is a u64 length and UTF-8 bytes; an array a u32
item type, a u64 count and the items); each tensor a string name, u32 dimension count, u64
dimensions (fastest first), u32 ggml type and u64 offset from the data section, which starts at
the next multiple of `general.alignment` (32 by default).
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import numpy as np

# metadata value types: the numeric ones as numpy dtypes, 8 a string, 9 an array
_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?"}
_SCALARS |= {10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
# ggml types held as numpy elements (as GGUFReader holds them; any other, bf16 included, as bytes)
_ELEMENTS = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "I8": "<i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}
VERSIONS = (2, 3)


@dataclasses.dataclass(frozen=True)
class Tensor:
  name: str
  tensor_type: Any  # gguf.GGMLQuantizationType
  shape: tuple[int, ...]  # GGUF order: the fastest-varying dimension first
  data: np.ndarray  # the file's bytes: elements for float/int types, [rows, bytes per row] for quantized ones


class _Reader:
  """Reads values at a moving offset of a byte buffer."""

  def __init__(self, buffer: np.ndarray):
    self.buffer, self.at = buffer, 0

  def unpack(self, fmt: str) -> tuple:
    values = struct.unpack_from(fmt, self.buffer, self.at)
    self.at += struct.calcsize(fmt)
    return values

  def string(self) -> str:
    (n,) = self.unpack("<Q")
    raw = bytes(self.buffer[self.at : self.at + n])
    if len(raw) != n:
      raise ValueError(f"a string of {n} bytes runs past the end of the file at offset {self.at}")
    self.at += n
    return raw.decode("utf-8")

  def value(self, value_type: int) -> Any:
    if value_type == _STRING:
      return self.string()
    if value_type == _ARRAY:
      item_type, count = self.unpack("<IQ")
      if item_type == _STRING:
        return [self.string() for _ in range(count)]
      if item_type not in _SCALARS:
        raise ValueError(f"an array of metadata type {item_type} (expected one of {sorted(_SCALARS)} or a string)")
      dtype = np.dtype(_SCALARS[item_type])
      items = np.frombuffer(self.buffer, dtype, count, self.at).copy()
      self.at += dtype.itemsize * count
      return items
    if value_type not in _SCALARS:
      raise ValueError(f"metadata type {value_type} is not a GGUF type")
    dtype = np.dtype(_SCALARS[value_type])
    item = np.frombuffer(self.buffer, dtype, 1, self.at)[0].item()
    self.at += dtype.itemsize
    return item


def read(path: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
  """(metadata {key: int, float, bool, str, list of str or numpy array}, tensors {name: Tensor})
  of the GGUF file at `path`; ValueError (struct.error, IndexError) for a file that is not one or
  is cut short."""
  from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
  from gguf.quants import quant_shape_to_byte_shape

  buffer = np.memmap(path, mode="r")
  if bytes(buffer[:4]) != b"GGUF":
    raise ValueError("it does not start with the GGUF magic")
  r = _Reader(buffer)
  r.at = 4
  version, n_tensors, n_fields = r.unpack("<IQQ")
  if version not in VERSIONS:
    raise ValueError(f"GGUF version {version} (big-endian, or unknown); this reader takes versions {VERSIONS}")
  fields = {}
  for _ in range(n_fields):
    key = r.string()
    fields[key] = r.value(r.unpack("<I")[0])
  table = []
  for _ in range(n_tensors):
    name = r.string()
    (n_dims,) = r.unpack("<I")
    shape = r.unpack(f"<{n_dims}Q")
    tensor_type, offset = r.unpack("<IQ")
    table.append((name, shape, GGMLQuantizationType(tensor_type), offset))
  alignment = fields.get("general.alignment", 32)
  if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
    raise ValueError(f"general.alignment {alignment!r}: expected a power of two")
  start = -(-r.at // alignment) * alignment
  tensors = {}
  for name, shape, tensor_type, offset in table:
    n = int(np.prod(shape))
    block, block_bytes = GGML_QUANT_SIZES[tensor_type]
    begin, end = start + offset, start + offset + n * block_bytes // block
    if end > len(buffer):
      raise ValueError(f"tensor {name!r} ends at byte {end:,}, past the end of the file ({len(buffer):,} bytes)")
    numpy_shape = tuple(reversed(shape))
    if tensor_type.name in _ELEMENTS:  # float and integer types: the elements themselves
      data = buffer[begin:end].view(_ELEMENTS[tensor_type.name]).reshape(numpy_shape)
    else:
      data = buffer[begin:end].reshape(quant_shape_to_byte_shape(numpy_shape, tensor_type))
    tensors[name] = Tensor(name, tensor_type, shape, data)
  return fields, tensors
