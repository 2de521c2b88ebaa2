"""The data path's worker pool: results in order, pieces really spread over threads, a failed
piece raised in the caller only after the others ended, and the count checked."""

import threading
import time

import pytest

from scope_jax.parallel.workers import WorkerPool, resolve_workers, row_pieces


def test_results_come_in_task_order_from_several_threads():
  pool, barrier = WorkerPool(3, "test worker"), threading.Barrier(3, timeout=10)

  def task(i):
    barrier.wait()  # only three threads at once can pass: the pool really runs pieces together
    return i, threading.current_thread().name

  results = pool.run([lambda i=i: task(i) for i in range(6)])
  assert [i for i, _ in results] == list(range(6))
  assert len({name for _, name in results}) == 3 and all(n.startswith("test worker") for _, n in results)
  pool.close()


def test_one_worker_runs_inline_on_the_calling_thread():
  pool = WorkerPool(1, "inline")
  assert pool.run([threading.current_thread for _ in range(3)]) == [threading.current_thread()] * 3


def test_a_failed_piece_is_raised_after_the_pieces_already_running_ended():
  pool, ended = WorkerPool(2, "test worker"), []

  def slow():
    time.sleep(0.3)
    ended.append("slow")

  def bad():
    raise ValueError("piece 1 failed")

  with pytest.raises(ValueError, match="piece 1 failed"):
    pool.run([slow, bad, slow, slow])
  assert "slow" in ended  # the running piece finished before the error reached the caller
  count = len(ended)
  time.sleep(0.5)
  assert len(ended) == count  # nothing still running behind the caller's back
  pool.close()


def test_worker_counts_and_pieces():
  assert resolve_workers(3, "data.workers") == 3 and resolve_workers(0, "data.workers") >= 1
  with pytest.raises(ValueError, match=r"data.workers -1: expected a thread count >= 1, or 0 for the host's cores"):
    resolve_workers(-1, "data.workers")
  assert row_pieces(10, 4) == [(0, 4), (4, 8), (8, 10)] and row_pieces(0, 4) == []
