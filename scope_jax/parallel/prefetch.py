"""Background threads, the three ways the pipeline uses them: items made ahead by index (the
loader's batches), an iterator run ahead (extraction's tokenized batches), and a worker consuming
a bounded queue (extraction's writer). Each is named, and a failure in one is reported on stderr
at once, naming the thread, then raised in the caller at its next call (which comes within one
item); a thread whose caller may never call again (the lease's renewal) ends the process instead.
"""

from __future__ import annotations

import itertools
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
_END = object()
THREAD_FAILED = 70  # the exit code of a process ended by a failed background thread (EX_SOFTWARE)


def report_failure(thread: str, error: BaseException) -> None:
  """One line on stderr naming the failed thread and its error."""
  print(f"scope_jax: the {thread} thread failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)


def end_process(thread: str, error: BaseException) -> None:
  """Ends the whole process now (exit code THREAD_FAILED), naming the failed thread: for a thread
  whose failure the main thread would otherwise never see. Everything the project writes survives
  a process ending at any moment (it survives kill -9), so nothing is left half-written."""
  report_failure(thread, error)
  print(f"scope_jax: ending the process (exit {THREAD_FAILED})", file=sys.stderr, flush=True)
  os._exit(THREAD_FAILED)


class _Producer:
  """Runs `items` on a background thread, up to `depth` ahead, until exhausted or stopped; an
  exception raised while making an item is handed over in its place."""

  def __init__(self, items: Iterator, depth: int, name: str):
    self._queue: queue.Queue = queue.Queue(depth)
    self._stop = threading.Event()
    self.name = name
    self._thread = threading.Thread(target=self._run, args=(items,), name=name, daemon=True)
    self._thread.start()

  def _run(self, items: Iterator) -> None:
    try:
      for item in items:
        if not self._put(item):
          return
      self._put(_END)
    except BaseException as e:
      report_failure(self.name, e)
      self._put(e)

  def _put(self, item) -> bool:
    """Queues `item` unless stopped first (a full queue is retried, so `stop` is never blocked)."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def next(self):
    """The next item (`_END` after the last); raises the exception made in an item's place."""
    item = self._queue.get()
    if isinstance(item, BaseException):
      raise item
    return item

  def stop(self) -> None:
    self._stop.set()
    self._thread.join()


class Prefetcher(Generic[T]):
  """`get(i)` returns `make(i)`, made on a background thread up to `depth` items ahead while the
  caller asks in order (i, i+1, ...); asking out of order restarts the thread there. An exception
  raised by `make` is raised by the `get` that would have returned its item."""

  def __init__(self, make: Callable[[int], T], depth: int = 2, name: str = "prefetch"):
    self.make, self.depth, self.name = make, depth, name
    self._producer: _Producer | None = None
    self._next: int | None = None

  def get(self, i: int) -> T:
    if self._next != i:
      self.close()
      self._producer = _Producer(map(self.make, itertools.count(i)), self.depth, self.name)
    self._next = None  # until the item is in hand: after an error the next get restarts
    item = self._producer.next()
    self._next = i + 1
    return item

  def close(self) -> None:
    """Stops the thread (items made ahead are dropped)."""
    if self._producer is not None:
      self._producer.stop()
      self._producer = None
    self._next = None


class BackgroundWorker(threading.Thread):
  """Runs `fn(item)` for items from a bounded queue; remembers the first error."""

  def __init__(self, fn: Callable[[T], None], maxsize: int, name: str = "worker"):
    super().__init__(name=name, daemon=True)
    self.fn, self.queue, self.error = fn, queue.Queue(maxsize), None

  def run(self) -> None:
    while (item := self.queue.get()) is not None:
      if self.error is None:
        try:
          self.fn(item)
        except BaseException as e:  # surfaced by the main thread at its next put
          report_failure(self.name, e)
          self.error = e

  def put(self, item: T) -> None:
    """Queues `item` (waiting while the queue is full); raises the worker's first error, if any."""
    if self.error is not None:
      raise self.error
    self.queue.put(item)

  def finish(self) -> None:
    """Waits until every queued item is done; raises the worker's first error, if any."""
    self.queue.put(None)
    self.join()
    if self.error is not None:
      raise self.error


def prefetch_iterator(iterator: Iterable[T], depth: int, name: str = "prefetch") -> Iterator[T]:
  """Iterates `iterator` in a background thread, `depth` items ahead (stopped when the loop ends
  or is abandoned)."""
  producer = _Producer(iter(iterator), depth, name)
  try:
    while (item := producer.next()) is not _END:
      yield item
  finally:
    producer.stop()
