"""GGUF files (llama.cpp): hyper-parameters, dequantized weights and the sentencepiece tokenizer.

Conventions checked against transformers loading the same file (tests/models/test_gemma3.py):
- llama.cpp's converter stores every Gemma RMSNorm weight as `1 + w`; we subtract the 1.
- Q/K projections are not permuted for Gemma (NEOX-style RoPE), so weights keep HF's layout.
- The metadata has no local RoPE base, layer pattern or query scale; llama.cpp's Gemma 3
  values are used: local base 10,000, 5 sliding layers then 1 global, query scale
  `head_dim^-1/2` (27B: `(d_model / n_heads)^-1/2`).
"""

from __future__ import annotations

import os
import re
import struct

import numpy as np

from scope_jax.models import checkpoints, gguf_format
from scope_jax.models.config import GemmaConfig, alternating_layer_types

SUPPORTED_ARCHITECTURES = ("gemma2", "gemma3")

# HF tensor name (without "model.") -> GGUF tensor name; `{i}` is the layer index.
_NAMES = {
  "embed_tokens.weight": "token_embd.weight",
  "norm.weight": "output_norm.weight",
  "layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
  "layers.{i}.post_attention_layernorm.weight": "blk.{i}.post_attention_norm.weight",
  "layers.{i}.pre_feedforward_layernorm.weight": "blk.{i}.ffn_norm.weight",
  "layers.{i}.post_feedforward_layernorm.weight": "blk.{i}.post_ffw_norm.weight",
  "layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
  "layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
  "layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
  "layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
  "layers.{i}.self_attn.q_norm.weight": "blk.{i}.attn_q_norm.weight",
  "layers.{i}.self_attn.k_norm.weight": "blk.{i}.attn_k_norm.weight",
  "layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
  "layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
  "layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
  match = re.fullmatch(r"layers\.(\d+)\.(.*)", hf_name)
  if match is None:
    return _NAMES[hf_name]
  return _NAMES["layers.{i}." + match.group(2)].format(i=match.group(1))


class GGUFModel:
  """An opened GGUF file: `.config`, `.reader()` for the weights, `.tokenizer_proto()`."""

  def __init__(self, path: str):
    self.path = os.fspath(path)
    if not os.path.exists(self.path):
      raise FileNotFoundError(f"GGUF file {self.path} does not exist")
    try:
      self._fields, self._tensors = gguf_format.read(self.path)
    except (ValueError, struct.error, IndexError, UnicodeDecodeError) as e:  # short, damaged or not GGUF
      raise ValueError(f"{self.path}: not a readable GGUF file; it is truncated or corrupt ({e})") from None
    self.architecture = self.field("general.architecture")
    if self.architecture not in SUPPORTED_ARCHITECTURES:
      raise ValueError(
        f"{self.path}: architecture {self.architecture!r} is not supported; expected one of {SUPPORTED_ARCHITECTURES}"
      )
    self.config = self._config()

  def field(self, key: str, default=None):
    if key not in self._fields:
      if default is None:
        raise ValueError(f"{self.path}: metadata field {key!r} is missing")
      return default
    return self._fields[key]

  def _config(self) -> GemmaConfig:
    arch = self.architecture
    gemma3 = arch == "gemma3"
    n_layers = int(self.field(f"{arch}.block_count"))
    d_model = int(self.field(f"{arch}.embedding_length"))
    n_heads = int(self.field(f"{arch}.attention.head_count"))
    head_dim = int(self.field(f"{arch}.attention.key_length", d_model // n_heads))
    query_scalar = d_model / n_heads if (gemma3 and d_model == 5376) else head_dim  # 27B
    if "token_embd.weight" not in self._tensors:
      raise ValueError(f"{self.path}: tensor 'token_embd.weight' is missing")
    vocab = int(self._tensors["token_embd.weight"].shape[-1])  # GGUF shapes are [d_model, vocab]
    return GemmaConfig(
      model_type="gemma3_text" if gemma3 else "gemma2",
      vocab_size=vocab,
      d_model=d_model,
      n_layers=n_layers,
      n_heads=n_heads,
      n_kv_heads=int(self.field(f"{arch}.attention.head_count_kv", n_heads)),
      head_dim=head_dim,
      d_ff=int(self.field(f"{arch}.feed_forward_length")),
      query_pre_attn_scalar=float(query_scalar),
      layer_types=alternating_layer_types(n_layers, 6 if gemma3 else 2),
      sliding_window=int(self.field(f"{arch}.attention.sliding_window", 4096)),
      rope_theta_global=float(self.field(f"{arch}.rope.freq_base", 1_000_000.0 if gemma3 else 10_000.0)),
      rope_theta_local=10_000.0,
      attn_logit_softcap=None if gemma3 else float(self.field(f"{arch}.attn_logit_softcapping", 50.0)),
      final_logit_softcap=None if gemma3 else float(self.field(f"{arch}.final_logit_softcapping", 30.0)),
      qk_norm=gemma3,
      rms_norm_eps=float(self.field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
      bos_id=int(self.field("tokenizer.ggml.bos_token_id", 2)),
      eos_id=int(self.field("tokenizer.ggml.eos_token_id", 1)),
      pad_id=int(self.field("tokenizer.ggml.padding_token_id", 0)),
    )

  def tensor(self, hf_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """One dequantized float32 tensor, by its HF name, in HF layout."""
    from gguf.quants import dequantize

    name = gguf_name(hf_name)
    t = self._tensors.get(name)
    if t is None:
      raise ValueError(f"{self.path}: tensor {name!r} is missing (expected shape {shape})")
    try:
      x = dequantize(t.data, t.tensor_type)
    except NotImplementedError:
      raise ValueError(
        f"{self.path}: tensor {name!r} has quantization type {t.tensor_type.name}, which cannot be dequantized"
      ) from None
    x = checkpoints.checked_shape(self.path, name, x.reshape([int(n) for n in reversed(t.shape)]), shape)
    return x - 1.0 if name.endswith("norm.weight") else x

  def reader(self, config: GemmaConfig) -> checkpoints.Reader:
    return checkpoints.hf_layout_reader(self.tensor, config)

  def tokenizer_proto(self) -> bytes:
    """A sentencepiece BPE model equivalent to the tokenizer stored in the metadata."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    if self.field("tokenizer.ggml.model") != "llama":
      raise ValueError(
        f"{self.path}: tokenizer model {self.field('tokenizer.ggml.model')!r} "
        "is not a sentencepiece ('llama') tokenizer"
      )
    tokens = self.field("tokenizer.ggml.tokens")
    scores = self.field("tokenizer.ggml.scores")
    types = self.field("tokenizer.ggml.token_type")
    proto = sp_pb2.ModelProto()
    spec = proto.trainer_spec
    spec.model_type = sp_pb2.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = True
    spec.allow_whitespace_only_pieces = True
    spec.split_digits = True
    special = {
      "unk": int(self.field("tokenizer.ggml.unknown_token_id", 3)),
      "bos": self.config.bos_id,
      "eos": self.config.eos_id,
      "pad": self.config.pad_id,
    }
    for name, index in special.items():
      setattr(spec, f"{name}_id", index)
      setattr(spec, f"{name}_piece", tokens[index])
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(self.field("tokenizer.ggml.add_space_prefix", False))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    piece_type = sp_pb2.ModelProto.SentencePiece
    for index, (piece, score, kind) in enumerate(zip(tokens, scores, types, strict=True)):
      if kind == piece_type.CONTROL and index not in special.values():
        # Like transformers' tokenizer (and Gemma's own chat markup), tokens such as
        # <start_of_turn> are recognized when they appear in text.
        kind = piece_type.USER_DEFINED
      if kind == piece_type.USER_DEFINED:
        piece = piece.replace(" ", "\u2581")  # whitespace runs are matched after escaping
      proto.pieces.add(piece=piece, score=float(score), type=int(kind))
    return proto.SerializeToString()
