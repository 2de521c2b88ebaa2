"""Ctrl-C acted on between a loop's steps, so that a press is never lost.

Python's default handler raises KeyboardInterrupt wherever the main thread is. When that is inside
JAX's garbage-collection callback, the exception is printed as "Exception ignored in
_xla_gc_callback" and dropped (jax-ml/jax#18246): the job runs on and the user must press again,
and a short job can finish instead of stopping. This handler only records the press (recording
cannot be dropped); `check()` raises it at the loop's next step. A second Ctrl-C interrupts at
once, as the default would. The training loop's `Preemption` (train/checkpoints.py) does the same
for SIGTERM and Ctrl-C with a checkpoint.
"""

from __future__ import annotations

import signal
import threading


class CtrlC:
  """`with CtrlC() as ctrl_c: for ...: ...; ctrl_c.check()`. Outside the main thread it records
  nothing (only the main thread receives signals) and `check()` never raises."""

  def __init__(self):
    self.pressed = False
    self._previous = None

  def __enter__(self) -> CtrlC:
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGINT, self._press)
    return self

  def _press(self, signum, frame) -> None:
    self.pressed = True
    signal.signal(signal.SIGINT, self._previous)  # a second Ctrl-C interrupts at once

  def check(self) -> None:
    if self.pressed:
      raise KeyboardInterrupt

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)
