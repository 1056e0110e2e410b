"""`prefetch_map`: compute the next items in threads while the caller works on this one.

Used to decode images ahead of the device (the bulk job) and to build the next
training batch while the current step runs. Work happens in threads, so it overlaps
with the caller only where it releases the GIL: image decoders (OpenCV), NumPy,
file reads, or waiting on a device.
"""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Callable, Deque, Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetch_map(fn: Callable[[T], R], items: Iterable[T], *, ahead: int = 1,
                 workers: Optional[int] = None, name: str = "samjax-prefetch"
                 ) -> Iterator[R]:
  """Yields `fn(item)` for each item, in order, computing up to `ahead` items early.

  While the caller holds a result, at most `ahead` later calls are queued or running,
  so at most `ahead + 1` results exist at once once the caller drops each result
  before asking for the next (the memory bound of a prefetching loader). `items` is
  consumed lazily, in the caller's thread.

  An exception raised by `fn` is re-raised by the iterator at that item's position;
  wrap `fn` to turn per-item errors into values instead. Closing the iterator early
  (`close()`, `break` in a for loop, garbage collection) cancels queued calls and
  waits for the running ones, so no work continues after it.

  Args:
    fn: the work for one item; called in a worker thread (in the caller's thread
      when `ahead` is 0).
    items: the inputs, in output order.
    ahead: calls started before their result is asked for; 0 computes each item
      only when it is asked for.
    workers: threads (default `ahead`); more than `ahead` is useless.
    name: thread name prefix, for debuggers and profilers.

  Yields:
    `fn(item)` for each item of `items`, in order.
  """
  if ahead < 0:
    raise ValueError(f"ahead must be >= 0, got {ahead}")
  if workers is not None and workers < 1:
    raise ValueError(f"workers must be >= 1, got {workers}")
  if ahead == 0:
    for item in items:
      yield fn(item)
    return
  source = iter(items)
  pool = concurrent.futures.ThreadPoolExecutor(workers or ahead, thread_name_prefix=name)
  pending: Deque[concurrent.futures.Future] = collections.deque()
  exhausted = False

  def fill() -> None:
    nonlocal exhausted
    while not exhausted and len(pending) < ahead:
      try:
        item = next(source)
      except StopIteration:
        exhausted = True
        return
      pending.append(pool.submit(fn, item))

  try:
    fill()
    while pending:
      result = pending.popleft().result()
      # Refill after the wait: with the result about to be handed out, this keeps
      # exactly `ahead` calls in flight behind it.
      fill()
      yield result
      del result  # Do not keep the caller's previous result alive while waiting.
  finally:
    for f in pending:
      f.cancel()
    pool.shutdown(wait=True, cancel_futures=True)
