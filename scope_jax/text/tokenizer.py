"""A sentencepiece tokenizer with the Gemma conventions (BOS prepended, special ids exposed)."""

from __future__ import annotations

import sentencepiece as spm


class Tokenizer:
  """Wraps a `sentencepiece.SentencePieceProcessor` (available as `.sp`)."""

  def __init__(self, model_proto: bytes, source: str = "tokenizer"):
    self.sp = spm.SentencePieceProcessor()
    try:
      self.sp.LoadFromSerializedProto(model_proto)
    except Exception as e:  # sentencepiece raises a bare RuntimeError/OSError
      raise ValueError(f"{source}: not a valid sentencepiece model ({e})") from None
    self.model_proto = model_proto
    self.source = source
    self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
    self.vocab_size = self.sp.GetPieceSize()

  @classmethod
  def from_file(cls, path: str) -> Tokenizer:
    with open(path, "rb") as f:
      return cls(f.read(), source=path)

  def encode(self, text: str, add_bos: bool = True) -> list[int]:
    ids = self.sp.EncodeAsIds(text)
    return [self.bos_id, *ids] if add_bos else ids

  def decode(self, ids) -> str:
    return self.sp.DecodeIds([int(i) for i in ids])
