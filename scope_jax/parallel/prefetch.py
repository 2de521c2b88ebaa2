"""Background threads, the three ways the pipeline uses them: items made ahead by index (the
loader's batches), an iterator run ahead (extraction's tokenized batches), and a worker consuming
a bounded queue (extraction's writer)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Prefetcher(Generic[T]):
  """`get(i)` returns `make(i)`, made on a background thread up to `depth` items ahead while the
  caller asks in order (i, i+1, ...); asking out of order restarts the thread there. An exception
  raised by `make` is raised by the `get` that would have returned its item."""

  def __init__(self, make: Callable[[int], T], depth: int = 2):
    self.make, self.depth = make, depth
    self._queue: queue.Queue | None = None
    self._thread: threading.Thread | None = None
    self._stop = threading.Event()
    self._next: int | None = None

  def get(self, i: int) -> T:
    if self._next != i:
      self._start(i)
    item = self._queue.get()
    if isinstance(item, BaseException):
      self._next = None
      raise item
    self._next = i + 1
    return item

  def _start(self, first: int) -> None:
    self.close()
    stop, q = threading.Event(), queue.Queue(self.depth)
    self._stop, self._queue = stop, q

    def produce():
      i = first
      while not stop.is_set():
        try:
          item = self.make(i)
        except BaseException as e:
          item = e
        while not stop.is_set():
          try:
            q.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if isinstance(item, BaseException):
          return
        i += 1

    self._thread = threading.Thread(target=produce, daemon=True)
    self._thread.start()

  def close(self) -> None:
    """Stops the thread (items made ahead are dropped)."""
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None
    self._next = None


class BackgroundWorker(threading.Thread):
  """Runs `fn(item)` for items from a bounded queue; remembers the first error."""

  def __init__(self, fn: Callable[[T], None], maxsize: int):
    super().__init__(daemon=True)
    self.fn, self.queue, self.error = fn, queue.Queue(maxsize), None

  def run(self) -> None:
    while (item := self.queue.get()) is not None:
      if self.error is None:
        try:
          self.fn(item)
        except BaseException as e:  # surfaced by the main thread
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


def prefetch_iterator(iterator: Iterable[T], depth: int) -> Iterator[T]:
  """Iterates `iterator` in a background thread, `depth` items ahead."""
  q: queue.Queue = queue.Queue(depth)
  sentinel = object()

  def produce():
    try:
      for item in iterator:
        q.put(item)
      q.put(sentinel)
    except BaseException as e:
      q.put(e)

  threading.Thread(target=produce, daemon=True).start()
  while (item := q.get()) is not sentinel:
    if isinstance(item, BaseException):
      raise item
    yield item
