"""Helpers shared by tests: tiny transformers models and their activations via forward hooks."""

from __future__ import annotations

import numpy as np
import torch


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.15, norm_std: float = 0.5) -> None:
  """Random weights everywhere, norms included (HF initializes norm weights to zero)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      s = norm_std if "norm" in name else std
      p.copy_(torch.randn(p.shape, generator=g) * s)


def tiny_gemma2(path, seed: int = 0, **overrides):
  """A small random transformers Gemma 2 saved to `path`; returns the torch model."""
  from transformers import Gemma2Config, Gemma2ForCausalLM

  kwargs = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    sliding_window=5,
    attn_logit_softcapping=4.0,
    final_logit_softcapping=2.0,
    query_pre_attn_scalar=24,
    max_position_embeddings=128,
    rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
  )
  kwargs.update(overrides)
  model = Gemma2ForCausalLM(Gemma2Config(**kwargs)).eval()
  model.config._attn_implementation = "eager"
  randomize_(model, seed)
  model.save_pretrained(path)
  return model


def hf_run(model, tokens: np.ndarray, sites: list[str], edit: dict | None = None):
  """Logits and site activations of a transformers Gemma, captured with forward hooks.

  `edit={site: fn}` replaces that site's activation with fn(activation) inside the forward.
  """
  edit = edit or {}
  layers = model.model.layers
  captured, handles = {}, []

  def output_hook(name):
    def hook(module, args, out):
      tensor = out[0] if isinstance(out, tuple) else out
      captured[name] = tensor.detach().float().numpy().copy()
      if name in edit:
        new = edit[name](tensor)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    return hook

  def input_hook(name):
    def hook(module, args):
      captured[name] = args[0].detach().float().numpy().copy()
      if name in edit:
        return (edit[name](args[0]), *args[1:])

    return hook

  for name in set(sites) | set(edit):
    kind, layer = name.split(".")
    layer = layers[int(layer)]
    if kind == "att":
      handles.append(layer.self_attn.o_proj.register_forward_pre_hook(input_hook(name)))
    else:
      module = {"mlp": layer.post_feedforward_layernorm, "mlp_in": layer.pre_feedforward_layernorm, "res": layer}[kind]
      handles.append(module.register_forward_hook(output_hook(name)))
  try:
    with torch.no_grad():
      logits = model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
  finally:
    for h in handles:
      h.remove()
  return logits, {s: captured[s] for s in sites}


def rel_err(ours, ref) -> float:
  """Largest absolute difference relative to the largest reference magnitude."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def tiny_gemma3(path, seed: int = 0, **overrides):
  """A small random transformers Gemma 3 (text) saved to `path`; returns the torch model."""
  from transformers import Gemma3ForCausalLM, Gemma3TextConfig

  kwargs = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    sliding_window=5,
    query_pre_attn_scalar=24,
    max_position_embeddings=128,
    layer_types=[
      "sliding_attention",
      "full_attention",
      "sliding_attention",
      "sliding_attention",
      "full_attention",
      "full_attention",
    ],
    rope_parameters={
      "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
      "full_attention": {"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.0},
    },
  )
  kwargs.update(overrides)
  model = Gemma3ForCausalLM(Gemma3TextConfig(**kwargs)).eval()
  model.config._attn_implementation = "eager"
  randomize_(model, seed)
  model.save_pretrained(path)
  return model


def train_sentencepiece(vocab_size: int = 300, text: list[str] | None = None) -> bytes:
  """A real sentencepiece BPE model with Gemma's special ids (pad 0, eos 1, bos 2, unk 3)."""
  import io

  import sentencepiece as spm

  text = (
    text
    or [
      "the quick brown fox jumps over the lazy dog",
      "sparse autoencoders find features",
      "Gemma Scope trains JumpReLU SAEs on every layer",
    ]
    * 50
  )
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(text),
    model_writer=out,
    vocab_size=vocab_size,
    pad_id=0,
    eos_id=1,
    bos_id=2,
    unk_id=3,
    byte_fallback=True,
    minloglevel=2,
  )
  return out.getvalue()


def tiny_lm_dir(path, vocab_size: int = 512, seed: int = 0):
  """A tiny random Gemma 2 with a sentencepiece tokenizer trained on the bundled corpus: a
  complete model directory that loads, tokenizes and extracts in seconds."""
  from scope_jax.text.sources import iter_documents

  lines = [line for _, t in iter_documents("builtin:python-docs") for line in t.splitlines() if line.strip()]
  tiny_gemma2(path, seed=seed, vocab_size=vocab_size, num_hidden_layers=3, sliding_window=16)
  (path / "tokenizer.model").write_bytes(train_sentencepiece(vocab_size, lines[:5000]))
  return path


def start_processes(args: list[str], n: int = 2, devices: int = 2, cwd=None, **env) -> list:
  """Starts `args` as `n` real jax.distributed processes (SCOPE_JAX_* variables, `devices` fake
  CPU devices each, `env` added); their stdout and stderr are one text pipe each."""
  import os
  import socket
  import subprocess

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return [
    subprocess.Popen(
      args,
      cwd=cwd,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env=dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        SCOPE_JAX_COORDINATOR=f"127.0.0.1:{port}",
        SCOPE_JAX_NUM_PROCESSES=str(n),
        SCOPE_JAX_PROCESS_ID=str(i),
        **env,
      ),
    )
    for i in range(n)
  ]


def run_processes(args: list[str], n: int = 2, devices: int = 2, cwd=None, timeout: float = 300) -> list[str]:
  """Runs `args` as `n` real jax.distributed processes and returns their outputs; fails unless
  every one exits 0."""
  procs = start_processes(args, n, devices, cwd)
  outs = [p.communicate(timeout=timeout)[0] for p in procs]
  assert [p.returncode for p in procs] == [0] * n, outs
  return outs


def tree_hashes(root) -> dict[str, str]:
  """{relative path: sha256} of every file under `root`: what a refused or failed command must
  leave unchanged."""
  import hashlib
  from pathlib import Path

  root = Path(root)
  return {
    str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
  }


def cli_command(command: str, config: str, workdir, *extra: str) -> list[str]:
  """`scope-jax COMMAND --config CONFIG --workdir WORKDIR EXTRA...` as this interpreter runs it."""
  import sys

  return [sys.executable, "-m", "scope_jax.cli", command, "--config", config, "--workdir", str(workdir), *extra]
