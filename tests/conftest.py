"""Shared pytest setup.

8 fake CPU devices must be requested before JAX initialises its backend, so this
runs at import time of the test session. absl flags are marked parsed so that grain
worker processes (which read absl flags) do not abort under pytest.
"""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# Tests run small programs a few times each: most of their time is XLA compiling them, and
# most of that is LLVM optimising the CPU code. Skipping LLVM's optimisation passes leaves the
# arithmetic unchanged (fast-math stays off) and cuts compilation time.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += (" --xla_backend_optimization_level=0"
                              " --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

# Identical programs compiled by several tests (or test subprocesses) are compiled once.
_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".jax_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(_CACHE))
os.environ.setdefault("HVLM_COMPILATION_CACHE", os.path.abspath(_CACHE))  # run.py's default.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
