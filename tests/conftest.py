"""Test setup shared by every module.

Eight simulated CPU devices let the sharding tests build real meshes; they must be requested
before JAX initialises its backend, which is why this happens here, at import time. Single-device
code is unaffected: arrays land on device 0 unless a test places them.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import hypothesis  # noqa: E402

# No persistent compilation cache. A cache shared by the two xdist workers saved about 40 s of an
# 11-minute run, but four runs lost a worker to an abort inside it: three while loading an
# executable (XLA:CPU's deserialisation), one while writing one to a cache that the run had
# started empty (compilation_cache.put_executable_and_time, in the doctest of
# jsample.torch.sample_from_uniform). A test suite that can crash in a library's cache is worse
# than a slower one.

# Deterministic property tests: the same examples on every run and machine, no timing deadline
# (the first example of each shape pays for XLA compilation).
hypothesis.settings.register_profile(
    "jsample", derandomize=True, deadline=None, max_examples=40, print_blob=True
)
hypothesis.settings.load_profile("jsample")
