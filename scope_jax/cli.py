"""The `scope-jax` command."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from scope_jax.parallel.mesh import use_xnnpack_on_cpu


def demo(args: argparse.Namespace) -> None:
  """Loads a model, continues a prompt greedily, and prints activation statistics at sites."""
  import scope_jax as sj

  start = time.perf_counter()
  lm = sj.load_model(args.model)
  c = lm.config
  print(f"loaded {lm.source} in {time.perf_counter() - start:.1f}s: {c.model_type}, d_model={c.d_model}, "
        f"{c.n_layers} layers, {c.n_heads} heads / {c.n_kv_heads} kv, vocab {c.vocab_size}, "
        f"mesh {dict(lm.mesh.shape)}")
  if lm.tokenizer is None:
    sys.exit(f"{lm.source} has no tokenizer (tokenizer.model beside the checkpoint)")
  prompt_ids = lm.tokenizer.encode(args.prompt)
  out = lm.generate(prompt_ids, args.max_new_tokens)
  print(f"\n{args.prompt}\033[1m{lm.tokenizer.decode(out[len(prompt_ids):])}\033[0m\n")
  tokens = np.asarray([prompt_ids])
  acts = lm.activations(tokens, args.sites.split(","))
  print(f"{'site':>10} {'shape':>16} {'mean ||x||':>12} {'max |x|':>10}   (BOS excluded)")
  for site, act in acts.items():
    x = np.asarray(act)[0, 1:]
    print(f"{site:>10} {str(tuple(act.shape)):>16} {np.linalg.norm(x, axis=-1).mean():12.2f} {np.abs(x).max():10.2f}")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="scope-jax", description=__doc__)
  commands = parser.add_subparsers(dest="command", required=True)
  p = commands.add_parser("demo", help="generate text and print activation statistics at sites")
  p.add_argument("--model", default="gemma3-270m",
                 help="HF directory, google-deepmind checkpoint, .gguf file or embedded name")
  p.add_argument("--prompt", default="The Gemma Scope sparse autoencoders were trained to")
  p.add_argument("--max-new-tokens", type=int, default=20)
  p.add_argument("--sites", default="res.6,mlp.6,att.6,mlp_in.6,res.12")
  p.set_defaults(run=demo)
  args = parser.parse_args(argv)
  use_xnnpack_on_cpu()
  args.run(args)


if __name__ == "__main__":
  main()
