"""Test setup shared by every module.

Eight simulated CPU devices let the sharding tests build real meshes; they must be requested
before JAX initialises its backend, which is why this happens here, at import time. Single-device
code is unaffected: arrays land on device 0 unless a test places them.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import pathlib  # noqa: E402

import hypothesis  # noqa: E402
import jax  # noqa: E402

# Compiled programs are cached on disk: the two xdist workers share them, and reruns start warm.
jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(__file__).parents[1] / ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

# Deterministic property tests: the same examples on every run and machine, no timing deadline
# (the first example of each shape pays for XLA compilation).
hypothesis.settings.register_profile(
    "jsample", derandomize=True, deadline=None, max_examples=40, print_blob=True
)
hypothesis.settings.load_profile("jsample")
