"""The background prefetcher: items in order, restarts on a jump, errors where they belong."""

import threading

import pytest

from scope_jax.parallel.prefetch import Prefetcher


def test_items_come_in_order_made_ahead_and_a_jump_restarts():
  made = []

  def make(i):
    made.append(i)
    return i * i

  before = threading.active_count()
  p = Prefetcher(make, depth=2)
  assert [p.get(i) for i in range(5)] == [0, 1, 4, 9, 16]
  assert p.get(20) == 400 and p.get(21) == 441  # a jump: made from 20 on
  assert p.get(3) == 9
  p.close()
  assert 20 in made and made[:5] == [0, 1, 2, 3, 4]
  assert threading.active_count() == before  # close() stopped the producer


def test_an_error_is_raised_by_the_get_of_its_item():
  def make(i):
    if i == 3:
      raise ValueError(f"bad item {i}")
    return i

  p = Prefetcher(make, depth=4)
  assert [p.get(i) for i in range(3)] == [0, 1, 2]
  with pytest.raises(ValueError, match="bad item 3"):
    p.get(3)
  assert p.get(0) == 0  # usable again after a restart
  p.close()
