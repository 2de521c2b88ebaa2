"""The read order alone (no data): the loader's determinism guarantees as properties of the pure
(seed, streams, step) -> rows map."""

import numpy as np
import pytest

from scope_jax.data.order import StreamOrder, epoch_permutation

CHUNKS = [64] * 30 + [17, 5]  # shards end in short chunks


def _global_rows(order: StreamOrder, stream: int, step: int, batch: int) -> np.ndarray:
  """The store-wide row ids (chunk id, row in chunk) -> one integer, of a stream's step."""
  starts = np.concatenate([[0], np.cumsum(order.chunk_rows)])
  out = []
  for key, rows in order.plan(stream, step, batch):
    ids = order.window_ids(key)
    ends = np.cumsum(order.chunk_rows[ids])
    part = np.searchsorted(ends, rows, side="right")
    out.append(starts[ids[part]] + rows - np.concatenate([[0], ends])[part])
  return np.concatenate(out)


@pytest.mark.parametrize("streams, window_chunks, batch", [(1, 4, 50), (3, 2, 7), (4, 16, 64)])
def test_every_row_of_the_store_exactly_once_per_epoch(streams, window_chunks, batch):
  order = StreamOrder(CHUNKS, seed=5, streams=streams, window_chunks=window_chunks)
  seen = []
  for stream in range(streams):
    n = order.epoch_rows(stream, 0)
    steps = -(-n // batch)
    rows = np.concatenate([_global_rows(order, stream, s, batch) for s in range(steps)])
    assert len(rows) == steps * batch
    seen.append(rows[:n])
    next_epoch = rows[n:]  # the last step runs on into the next epoch
    assert len(np.unique(next_epoch)) == len(next_epoch)
  everything = np.concatenate(seen)
  assert sorted(everything) == list(range(sum(CHUNKS)))


def test_the_order_is_a_pure_function_of_seed_streams_and_step():
  a = StreamOrder(CHUNKS, seed=5, streams=2, window_chunks=4)
  b = StreamOrder(CHUNKS, seed=5, streams=2, window_chunks=4)
  forward = [_global_rows(a, 1, s, 32) for s in range(40)]
  backward = [_global_rows(b, 1, s, 32) for s in reversed(range(40))][::-1]  # asked in another order: resume
  for x, y in zip(forward, backward):
    np.testing.assert_array_equal(x, y)
  other_seed = StreamOrder(CHUNKS, seed=6, streams=2, window_chunks=4)
  assert not np.array_equal(forward[0], _global_rows(other_seed, 1, 0, 32))
  assert not np.array_equal(_global_rows(a, 1, 0, 32), _global_rows(a, 1, a.epoch_rows(1, 0) // 32 + 1, 32))


def test_rows_are_shuffled_within_windows_not_left_in_chunk_order():
  order = StreamOrder(CHUNKS, seed=0, streams=1, window_chunks=8)
  rows = _global_rows(order, 0, 0, 256)
  assert len(np.unique(rows // 64)) > 4  # one batch draws on many chunks of its window


def test_epoch_permutation_is_the_arrays_order_too():
  np.testing.assert_array_equal(epoch_permutation(3, 1, 10), np.random.default_rng([3, 1]).permutation(10))


def test_too_few_chunks_for_the_streams_is_an_error():
  with pytest.raises(ValueError, match="3 chunks cannot feed 4 streams"):
    StreamOrder([10, 10, 10], seed=0, streams=4, window_chunks=2)
