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

# Deterministic property tests: the same examples on every run and machine, no timing deadline
# (the first example of each shape pays for XLA compilation).
hypothesis.settings.register_profile(
    "jsample", derandomize=True, deadline=None, max_examples=40, print_blob=True
)
hypothesis.settings.load_profile("jsample")
