"""Which training step runs (`train.step`) and the sparse step's capacity (`train.capacity`).

- `dense`: the blocked dense step (train/step.py), every step.
- `sparse`: the sparse step (train/sparse.py), which itself runs the dense step at any step where a
  token has more slots than its capacity K. With `train.capacity = 0`, K starts at
  min(256, width/4) and grows at a logged step where a token had more slots
  (`auto_capacity`); K only decides when the dense step stands in, never a result. A group
  whose logged step had more slots than K fits runs the dense step (without the sparse step's
  slot search, which would be wasted) until a logged step says they fit again.
- `auto`: the dense step until a logged step's slots per token say the sparse step might win;
  then both are timed on the next steps (alternated, best of two each) and the sparse step runs
  on if it took under 90% of the dense step's time (`SWITCH_MARGIN`).
  While the dense one wins the timing is repeated every `PROBE_EVERY` logged steps. Timings are
  process 0's, broadcast, so every process runs the same program.

Every step is exact whichever runs; the choices (kind, capacities, timings) are kept beside each
checkpoint (`record`), so a resumed `dense` or `sparse` run is bit-identical to an uninterrupted
one. An `auto` run is bit-identical only after its switch: a timing repeated after a restart
may choose differently, and the two steps round differently.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from scope_jax.core.choices import TRAIN_STEPS

PROBE_EVERY = 10  # logged steps between timings while the dense step is the faster
SWITCH_MARGIN = 0.9  # auto switches when the sparse step takes under 90% of the dense step's time:
# a narrower win is within timing noise, and the sparse step's fallback steps cost more than dense ones
MAX_AUTO_CAPACITY = 1024  # slots per token the automatic capacity grows to at most


def auto_capacity(slots_max: float, width: int) -> int:
  """Room for 1.5× the most slots a token had, in multiples of 32; at most a quarter of the width
  (beyond that the sparse step cannot win) and `MAX_AUTO_CAPACITY`. The entries take 12 bytes
  per row and slot of capacity, so more room costs memory, not time."""
  return max(1, min(32 * math.ceil(1.5 * slots_max / 32), width // 4, MAX_AUTO_CAPACITY))


class StepChooser:
  """Runs each training step with the step `train.step` asks for, compiling each variant once."""

  def __init__(
    self,
    kind: str,
    capacity: int,
    widths: Sequence[int],
    make_step: Callable[[tuple[int, ...]], Callable],
    record: dict | None = None,
    log_every: int = 1,
  ):
    if kind not in TRAIN_STEPS:
      raise ValueError(f"train.step {kind!r}: expected one of {TRAIN_STEPS}")
    self.kind, self.fixed, self.widths, self.make_step = kind, capacity, list(widths), make_step
    self.probe_every = PROBE_EVERY * log_every
    if not record or record.get("kind") != kind:
      record = {}  # a run resumed with another train.step starts choosing afresh
    self.running = record.get("running", "sparse" if kind == "sparse" else "dense")
    initial = [capacity or min(256, max(1, w // 4)) for w in self.widths]
    self.capacities = tuple(initial if capacity else record.get("capacities", initial))
    self.fits = tuple(record.get("fits", [True] * len(self.widths)))  # per group: its slots fit last time
    self.next_probe = record.get("next_probe", 0)
    self.probes = list(record.get("probes", []))
    self._compiled: dict = {}
    self._probe: list[tuple[int, str]] = []  # (step, kind) still to time
    self._times: dict[str, list[float]] = {}

  def record(self) -> dict:
    """What a resumed run needs to choose as this one would (saved beside each checkpoint)."""
    return {
      "kind": self.kind,
      "running": self.running,
      "capacities": list(self.capacities),
      "fits": list(self.fits),
      "next_probe": self.next_probe,
      "probes": self.probes,
    }

  def _step_fn(self, kind: str, state, rows):
    capacities = tuple(k if fit else 0 for k, fit in zip(self.capacities, self.fits)) if kind == "sparse" else ()
    capacities = capacities if any(capacities) else ()
    if capacities not in self._compiled:
      self._compiled[capacities] = self.make_step(capacities).lower(state, rows).compile()
    return self._compiled[capacities]

  def run(self, step: int, state, rows):
    """Training step `step` (0-based) on `state`: `(state, metrics)`."""
    if not self._probe or self._probe[0][0] != step:
      return self._step_fn(self.running, state, rows)(state, rows)
    _, kind = self._probe.pop(0)
    fn = self._step_fn(kind, state, rows)
    jax.block_until_ready(state)
    start = time.perf_counter()
    state, metrics = fn(state, rows)
    jax.block_until_ready(state)
    self._times.setdefault(kind, []).append(time.perf_counter() - start)
    if not self._probe:
      self._decide(step + 1)
    return state, metrics

  def observe(self, step: int, slots_max: Sequence[float]) -> None:
    """After logged step `step` (1-based count), given each group's most slots per token."""
    if self.running == "sparse" and not self.fixed:
      grown = tuple(
        max(k, auto_capacity(n, w)) if n > k else k for k, n, w in zip(self.capacities, slots_max, self.widths)
      )
      if grown != self.capacities:
        tqdm.write(f"train: sparse step capacity {list(self.capacities)} -> {list(grown)} slots per token")
        self.capacities = grown
    if self.running == "sparse":
      self._note_fits(slots_max)
    if self.kind != "auto" or self.running == "sparse" or self._probe or step < self.next_probe:
      return
    if all(n > w // 4 for n, w in zip(slots_max, self.widths)):
      return  # too many slots for the sparse step to win anywhere
    if not self.fixed:
      self.capacities = tuple(auto_capacity(n, w) for n, w in zip(slots_max, self.widths))
    self._note_fits(slots_max)
    self._probe = [(step, "dense"), (step + 1, "sparse"), (step + 2, "dense"), (step + 3, "sparse")]
    self._times = {}

  def _note_fits(self, slots_max: Sequence[float]) -> None:
    """Which groups' most slots per token fit their capacity (the others run the dense step)."""
    self.fits = tuple(bool(n <= k) for n, k in zip(slots_max, self.capacities))

  def _decide(self, step: int) -> None:
    dense_s, sparse_s = min(self._times["dense"]), min(self._times["sparse"])
    dense_s, sparse_s = (float(v) for v in multihost_utils.broadcast_one_to_all(np.asarray([dense_s, sparse_s])))
    self.probes.append({"step": step, "dense_s": dense_s, "sparse_s": sparse_s, "capacities": list(self.capacities)})
    if sparse_s < SWITCH_MARGIN * dense_s:
      self.running = "sparse"
      tqdm.write(f"train: step {step}: the sparse step is faster ({sparse_s:.3f} s vs {dense_s:.3f} s); using it")
    else:
      self.next_probe = step + self.probe_every
