"""samjax.interop (torch <-> numpy) and samjax.io.prefetch (thread prefetching)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from samjax import interop
from samjax.io.prefetch import prefetch_map

# ---------------------------------------------------------------------------- interop


def test_numpy_side_needs_no_torch():
  x = np.arange(6).reshape(2, 3)
  assert interop.to_numpy(None) is None
  assert interop.to_numpy(x) is x
  y = interop.to_numpy(x, np.float32)
  assert y.dtype == np.float32 and y is not x
  y64 = interop.to_numpy(x.astype(np.float64), np.float64)
  assert not np.shares_memory(y64, x)  # A cast is always a new array.
  assert interop.to_numpy([[1, 2]]).shape == (1, 2)
  assert not interop.is_torch(x) and not interop.is_torch(3)
  assert interop.to_torch_like(x, False) is x


def test_torch_tensors():
  torch = pytest.importorskip("torch")
  t = torch.arange(6, dtype=torch.float32).reshape(2, 3).requires_grad_(True)
  assert interop.is_torch(t)
  np.testing.assert_array_equal(interop.to_numpy(t), np.arange(6).reshape(2, 3))
  bf = torch.ones(3, dtype=torch.bfloat16)
  assert interop.to_numpy(bf).dtype == np.float32
  back = interop.to_torch_like(np.arange(3, dtype=np.int32), True)
  assert isinstance(back, torch.Tensor) and back.dtype == torch.int32
  ro = np.arange(3)
  ro.flags.writeable = False
  back = interop.to_torch_like(ro, True)  # Copied, so no warning about read-only memory.
  back[0] = 7
  assert ro[0] == 0


# --------------------------------------------------------------------------- prefetch


def test_prefetch_map_order_and_ahead_bound():
  for ahead in (0, 1, 3):
    lock = threading.Lock()
    state = {"live": 0, "max": 0}

    def work(i):
      with lock:
        state["live"] += 1
        state["max"] = max(state["max"], state["live"])
      time.sleep(0.002)
      return i * i

    out = []
    for r in prefetch_map(work, range(20), ahead=ahead):
      time.sleep(0.005)  # The caller is busy; work runs ahead meanwhile.
      out.append(r)
      with lock:
        state["live"] -= 1
    assert out == [i * i for i in range(20)]
    assert state["max"] <= ahead + 1, (ahead, state)
    if ahead > 1:
      assert state["max"] > 1  # It does run ahead.


def test_prefetch_map_errors_and_early_close():
  def work(i):
    if i == 3:
      raise ValueError("item 3")
    return i

  it = prefetch_map(work, range(10), ahead=2)
  assert [next(it) for _ in range(3)] == [0, 1, 2]
  with pytest.raises(ValueError, match="item 3"):
    next(it)

  started = []
  it = prefetch_map(lambda i: started.append(i) or time.sleep(0.01), range(100), ahead=2)
  next(it)
  it.close()  # Cancels what is queued, waits for what runs.
  n = len(started)
  time.sleep(0.05)
  assert len(started) == n <= 3
  consumed = []

  def items():
    for i in range(100):
      consumed.append(i)
      yield i

  it = prefetch_map(lambda i: i, items(), ahead=2)
  next(it)
  assert len(consumed) <= 3  # Items are pulled lazily.
  it.close()
  with pytest.raises(ValueError):
    list(prefetch_map(str, [1], ahead=-1))
