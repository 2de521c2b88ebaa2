"""One job at a time on a workdir or a store: an exclusive lease, renewed while the job runs.

The lease is one small JSON object, `ROOT/LEASE` = {host, pid, started, renewed}, created and
renewed with tensorstore's conditional writes (a file on local disks and NFS, an object with a
generation precondition on GCS), so the same code guards a local workdir, one on a shared
filesystem and a `gs://` store. A second job finds it and stops at once, naming the holder.

A lease is stale, and is taken over (again by a conditional write, so two jobs cannot both take
it), when its holder is gone: on the same host, its process no longer exists (a `kill -9`); from
another host, it has not been renewed for `STALE_AFTER_S` (a thread renews it every
`RENEW_EVERY_S`). In a multi-process job only process 0 holds it, for the whole job.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import jax
import tensorstore as ts

from scope_jax.layout import gcs_hint, kvstore_spec, remote_timeout
from scope_jax.parallel.distributed import stop_together
from scope_jax.parallel.prefetch import end_process

LEASE = "LEASE"
RENEW_EVERY_S = 10.0
STALE_AFTER_S = 120.0


class LeaseHeld(RuntimeError):
  """Another live job holds the lease; the message names it."""


def _process_exists(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


def is_stale(holder: dict, now: float) -> bool:
  """True when `holder`'s job is gone: its process died (same host) or it stopped renewing."""
  if holder.get("host") == socket.gethostname() and not _process_exists(int(holder.get("pid", -1))):
    return True
  return now - float(holder.get("renewed", 0)) > STALE_AFTER_S


def _holder(value: bytes, where: str) -> dict:
  """The lease record in `value`; a file of that name that is not one is a user's (LeaseHeld: never
  overwritten). tensorstore writes whole values, so a lease is never torn."""
  try:
    holder = json.loads(bytes(value))
  except (UnicodeDecodeError, json.JSONDecodeError):
    holder = None
  if not isinstance(holder, dict) or not {"host", "pid", "renewed"} <= set(holder):
    raise LeaseHeld(f"{where} is not a scope_jax lease; it is left as it is: move it away or use another directory")
  return holder


def describe(holder: dict) -> str:
  started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
  return f"host {holder.get('host')}, pid {holder.get('pid')}, since {started}"


class Lease:
  """The lease on `root` (a local directory or `gs://bucket/prefix`), named `what` in messages."""

  def __init__(self, root: str, what: str, on_failure: Callable[[str, BaseException], None] = end_process):
    """`on_failure(thread, error)` is called when a renewal fails or finds the lease taken over; by
    default it ends the process (the job may no longer write `root`, and nothing else would stop it)."""
    self.root, self.what = str(root), what
    self._on_failure = on_failure
    self._kv = ts.KvStore.open(kvstore_spec(self.root)).result()
    self._generation: bytes | None = None
    self._record: dict = {}
    self._stop = threading.Event()
    self._renewer: threading.Thread | None = None
    self.lost = False  # set when a renewal finds the lease taken over

  def _write(self, record: dict, if_equal: bytes) -> bytes | None:
    """Writes `record` if the lease's generation is still `if_equal`; its new generation, or None."""
    stamp = self._kv.write(LEASE, json.dumps(record).encode(), if_equal=if_equal).result()
    return stamp.generation or None

  def acquire(self) -> None:
    """Takes the lease, or raises LeaseHeld naming the live holder."""
    now = time.time()
    current = self._kv.read(LEASE).result(timeout=remote_timeout(self.root))
    self._record = {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "renewed": now}
    if current.state != "missing":
      holder = _holder(current.value, f"{self.root}/{LEASE}")
      if not is_stale(holder, now):
        raise LeaseHeld(
          f"{self.what} {self.root} is in use by another job ({describe(holder)}; lease {self.root}/{LEASE}); "
          "wait for it to finish or stop it, or use another directory"
        )
    self._generation = self._write(self._record, current.stamp.generation)
    if self._generation is None:  # another job created or took it between our read and write
      raise LeaseHeld(f"{self.what} {self.root} was just taken by another job (lease {self.root}/{LEASE})")
    self._stop.clear()
    self._renewer = threading.Thread(target=self._renew, name=f"lease {self.root}", daemon=True)
    self._renewer.start()

  def _renew(self) -> None:
    """Renews every RENEW_EVERY_S. A failed renewal (tensorstore has already retried it) or a lease
    found taken over ends the job through `on_failure`: it could not keep others off `root`."""
    thread = f"lease renewal ({self.root}/{LEASE})"
    while not self._stop.wait(RENEW_EVERY_S):
      self._record["renewed"] = time.time()
      try:
        generation = self._write(self._record, self._generation)
      except Exception as e:
        self._give_up()
        self._on_failure(thread, e)
        return
      if generation is None:
        self.lost = True
        self._on_failure(thread, LeaseHeld(f"the lease was taken over by another job ({self._current_holder()})"))
        return
      self._generation = generation

  def _give_up(self) -> None:
    """Removes the lease if it is still ours (best effort: the storage may be what failed)."""
    with contextlib.suppress(Exception):
      self._kv.write(LEASE, None, if_equal=self._generation).result(timeout=5)
    self._generation = None

  def _current_holder(self) -> str:
    with contextlib.suppress(Exception):
      return describe(json.loads(bytes(self._kv.read(LEASE).result(timeout=5).value)))
    return "holder unknown"

  def release(self) -> None:
    """Stops renewing and removes the lease (only if it is still ours)."""
    self._stop.set()
    if self._renewer is not None:
      self._renewer.join()
      self._renewer = None
    if self._generation is not None and not self.lost:
      self._give_up()
    self._generation = None


_held: set[str] = set()  # roots this process holds: holding one again (a sweep's store) is a no-op


@contextlib.contextmanager
def holding(root: str, what: str) -> Iterator[None]:
  """Holds the lease on `root` for the block, from process 0 of a (possibly multi-process) job.

  Every process learns whether process 0 got it, so all stop together when another job holds it.
  A root that cannot be written (a read-only finished workdir) is used without a lease: no one
  can change it, and a stage that needs to write there fails with its own error."""
  key = str(root) if str(root).startswith("gs://") else os.path.abspath(root)
  if key in _held:
    yield
    return
  lease, failure = None, None  # failure: process 0's reason to stop, raised on every process
  if jax.process_index() == 0:
    try:
      if not str(root).startswith("gs://"):
        os.makedirs(root, exist_ok=True)
      lease = Lease(root, what)
      lease.acquire()
    except LeaseHeld as e:
      lease, failure = None, e
    except (OSError, ValueError, TimeoutError) as e:  # not writable: tensorstore reports it as ValueError
      lease = None
      if str(root).startswith("gs://"):  # unreachable, unauthenticated or missing: nothing can run there
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300] or type(e).__name__
        failure = ValueError(f"{what} {root} cannot be reached ({reason}){gcs_hint(root)}")
        failure.__cause__ = e
      elif os.access(root, os.W_OK):
        failure = e
      else:
        print(f"{what} {root}: not writable ({type(e).__name__}); running without a lease")
  stop_together(
    failure, lambda: LeaseHeld(f"{what} {root} is in use by another job or cannot be used (process 0's log names it)")
  )
  _held.add(key)
  try:
    yield
  finally:
    _held.discard(key)
    if lease is not None:
      lease.release()
