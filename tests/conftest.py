"""Test setup shared by every module.

Eight simulated CPU devices let the sharding tests build real meshes; they must be requested
before JAX initialises its backend, which is why this happens here, at import time. Single-device
code is unaffected: arrays land on device 0 unless a test places them.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import shutil  # noqa: E402
import tempfile  # noqa: E402

import hypothesis  # noqa: E402
import jax  # noqa: E402

# Compiled programs are cached on disk for one test run, so that the two xdist workers share them
# (about 40 s of an 11-minute run). Each run starts with an empty cache, as CI does, and removes it
# at the end. Five runs have lost a worker to an abort in XLA's native code: while loading an
# executable from the cache (three), while writing one to it, and once while compiling with no
# cache at all. Every one of them was in a doctest of jsample.sampling or jsample.torch, run late
# in a worker's life; the Makefile now runs the doctests in a process of their own.
_CACHE_DIR = "JSAMPLE_TEST_JAX_CACHE"
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # the controller (or a run without workers)
        os.environ[_CACHE_DIR] = tempfile.mkdtemp(prefix="jsample-jax-cache-")
    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_DIR])


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput"):
        shutil.rmtree(os.environ.pop(_CACHE_DIR, ""), ignore_errors=True)


# Deterministic property tests: the same examples on every run and machine, no timing deadline
# (the first example of each shape pays for XLA compilation).
hypothesis.settings.register_profile(
    "jsample", derandomize=True, deadline=None, max_examples=40, print_blob=True
)
hypothesis.settings.load_profile("jsample")
