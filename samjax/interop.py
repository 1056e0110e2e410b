"""PyTorch tensors in, PyTorch tensors out, for code written against the official package.

samjax computes with NumPy and JAX; these helpers let its entry points accept torch
tensors (on any device, requiring grad or not) and hand results back as tensors when
that is what came in. torch is never imported unless a tensor is actually seen, so
none of this needs it installed.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np


def is_torch(x: Any) -> bool:
  """Whether `x` is a torch object (a tensor), judged by its type's module."""
  return type(x).__module__.split(".")[0] == "torch"


def to_numpy(x: Any, dtype: Any = None) -> Optional[np.ndarray]:
  """`np.asarray(x)` that also takes torch tensors; None stays None.

  Tensors are detached and copied to the host; bfloat16 ones (which NumPy cannot hold
  without ml_dtypes) become float32 first.

  Args:
    x: None, a torch tensor, or anything `np.asarray` takes (including jax arrays).
    dtype: cast to this dtype; the result is then always a new array, so the caller
      may modify it without touching the input.
  """
  if x is None:
    return None
  if is_torch(x):
    x = x.detach().cpu()
    if str(x.dtype) == "torch.bfloat16":
      x = x.float()
    x = x.numpy()
  x = np.asarray(x)
  return x.astype(dtype) if dtype is not None else x


def to_torch_like(x: Any, like_torch: bool) -> Any:
  """`x` as a CPU torch tensor when `like_torch`, else unchanged.

  The array is copied first: torch warns on (and must not alias) read-only buffers
  such as the host views of jax arrays.
  """
  if not like_torch:
    return x
  import torch  # pylint: disable=import-outside-toplevel
  return torch.from_numpy(np.array(x))
