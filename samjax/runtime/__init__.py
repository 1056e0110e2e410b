"""The runtime: device layout, parameter placement and the compiled model functions.

* `mesh`: the device mesh (the one place that decides how work is spread).
* `engine`: `Runtime`, which places parameters and owns the compiled encode / decode /
  upscale, keyed by config, dtype, attention kernels and mesh.
  (Whether a GPU attention kernel runs on a device is asked by
  `samjax.modeling.kernel_probe`, beside the kernels it probes.)
"""

from samjax.runtime.engine import Runtime, compiled_functions, default_attention

__all__ = ["Runtime", "compiled_functions", "default_attention"]
