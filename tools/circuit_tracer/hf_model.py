"""The embedded Gemma 3 270M as a Hugging Face directory circuit-tracer's nnsight backend loads.

    python tools/circuit_tracer/hf_model.py model GGUF OUT        # in circuit-tracer's environment
    python tools/circuit_tracer/hf_model.py tokenizer GGUF OUT    # in scope_jax's (transformers 5.x)

The weights: transformers 4.57 (circuit-tracer's) reads the GGUF and writes safetensors and a
config it reads back. The tokenizer: transformers 5.x's, whose GGUF tokenizer splits words as the
model was trained (4.57's does not); the copied `tokenizer.model` is dropped so `tokenizer.json` is read.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path


def main(what: str, gguf: str, out: str) -> None:
  gguf_path, target = Path(gguf), Path(out)
  target.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    if what == "model":
      import torch
      from transformers import AutoModelForCausalLM

      model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
      model.save_pretrained(tmp)
    elif what == "tokenizer":
      from transformers import AutoTokenizer

      AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).save_pretrained(tmp)
      Path(tmp, "tokenizer.model").unlink(missing_ok=True)
    else:
      sys.exit(f"hf_model.py: expected 'model' or 'tokenizer', got {what!r}")
    for written in Path(tmp).iterdir():  # each file whole, moved in by rename
      shutil.move(str(written), target / written.name)


if __name__ == "__main__":
  if len(sys.argv) != 4:
    sys.exit(__doc__)
  main(*sys.argv[1:])
