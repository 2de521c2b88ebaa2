"""Training health: a loss gone NaN or Inf (`check_finite`), warnings about training that went
wrong, and the metrics: `metrics.jsonl` (one line per SAE per logged step) and TensorBoard
events, written by process 0 only."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from scope_jax.layout import RunLayout


class TrainingDiverged(RuntimeError):
  """A loss became NaN or Inf; the message names the SAE and step."""


def check_finite(state: dict, groups, last_checkpoint: int | None) -> None:
  """TrainingDiverged naming the first SAE whose loss became NaN or Inf, and at which step."""
  for group, bad in zip(groups, state["first_bad_step"]):
    bad = np.asarray(bad)
    if (bad >= 0).any():
      i = int(np.argmax(bad >= 0))
      raise TrainingDiverged(
        f"SAE {group.names[i]}: loss became NaN or Inf at step {int(bad[i])}; "
        f"the last checkpoint (step {last_checkpoint}) is kept, nothing later was saved"
      )


class MetricWriter:
  """metrics.jsonl and TensorBoard events, written by process 0; a resumed run starts them again
  at its checkpoint. Nothing is written (or rewritten) before the first new step is logged, so a
  rerun with nothing to do leaves a finished (even read-only) workdir alone."""

  def __init__(self, workdir: Path, resume_step: int):
    self.enabled = jax.process_index() == 0
    self.layout, self.resume_step = RunLayout(workdir), resume_step
    self.path = self.layout.metrics
    self._tb = None
    # read (and a damaged line refused) now, before any step is trained; rewritten on first write
    self._lines, self._kept = self._lines_to_keep(resume_step) if self.enabled else ([], [])

  def _start(self) -> None:
    if self._kept != self._lines:
      tmp = self.path.with_suffix(".jsonl.tmp")
      tmp.write_text("".join(self._kept))
      tmp.replace(self.path)
    from tensorboardX import SummaryWriter

    purge = self.resume_step + 1 if self.resume_step else None
    self._tb = SummaryWriter(str(self.layout.tensorboard), purge_step=purge)

  def _lines_to_keep(self, step: int) -> tuple[list[str], list[str]]:
    """(the log's lines, those to keep): a resumed run re-logs the steps after its checkpoint, so
    each step stays once. A torn last line (a crash mid-write) is dropped; a damaged line before
    it is an error naming it."""
    if not self.path.exists():
      return [], []
    lines = self.path.read_text().splitlines(keepends=True)
    kept = []
    for number, line in enumerate(lines, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        if number == len(lines):
          continue
        raise ValueError(f"{self.path}: line {number} is not JSON ({e}); remove or repair it to resume") from e
      if record["step"] <= step:
        kept.append(line if line.endswith("\n") else line + "\n")
    return lines, kept

  def write(self, step: int, per_sae: dict[str, dict[str, float]]) -> None:
    if not self.enabled:
      return
    if self._tb is None:
      self._start()
    with self.path.open("a") as f:
      for name, values in per_sae.items():
        f.write(json.dumps({"step": step, "sae": name, **values}) + "\n")
        for key, value in values.items():
          self._tb.add_scalar(f"{name}/{key}", value, step)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def per_sae_metrics(names: list[list[str]], metrics: list[dict[str, jax.Array]]) -> dict[str, dict[str, float]]:
  """Per-group stacked metric vectors -> {sae name: {metric: float}}."""
  out = {}
  for group_names, group_metrics in zip(names, metrics):
    host = {k: np.asarray(v) for k, v in group_metrics.items()}
    for i, name in enumerate(group_names):
      out[name] = {k: float(v[i]) for k, v in host.items()}
  return out


def health_warnings(last: dict[str, dict[str, float]], groups, steps: int) -> list[str]:
  """What the final logged metrics say went wrong with JumpReLU SAEs, in words: thresholds that
  never trained (the failure peers report most), and L0 that does not fall as λ rises within a
  width. (A TopK or BatchTopK SAE has no threshold to train, and k sets its L0.)"""
  out = []
  groups = [g for g in groups if not g.ranked]
  jumprelu = {name for g in groups for name in g.names}
  for name, values in last.items():
    if name not in jumprelu:
      continue
    moved = values.get("threshold_moved", float("inf"))
    if moved < 0.1:
      out.append(
        f"SAE {name}: thresholds moved {moved:.1%} of their initial value in {steps} steps; they are "
        f"not training ({values.get('window_fraction', float('nan')):.2%} of pre-activations fall inside the "
        f"kernel window: recipe.bandwidth may be too small for the data's scale, or recipe.lr too low)"
      )
  for group in groups:
    for seed in sorted({seed for _, seed in group.members}):
      pairs = sorted(
        (lam, last[name]["l0"]) for (lam, s), name in zip(group.members, group.names) if s == seed and name in last
      )
      if any(hi >= lo for (_, lo), (_, hi) in zip(pairs, pairs[1:])):
        listed = ", ".join(f"λ {lam:g}: L0 {l0:.1f}" for lam, l0 in pairs)
        out.append(
          f"SAEs of width {group.width} (seed {seed}): L0 does not fall as λ rises ({listed}); the "
          f"sparsity penalty is not acting (too few steps after its warm-up, or λ too small to matter)"
        )
  return out
