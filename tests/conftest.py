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
import pytest  # noqa: E402

# Compiled programs are cached on disk for one test run, so that the two xdist workers share them
# (about 2 minutes of a 12-minute run). Each run starts with an empty cache, as CI does, and
# removes it at the end.
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


# XLA:CPU maps the code and data of every compiled kernel separately, so each sampler program
# holds about a thousand memory mappings until JAX drops it, and Linux gives a process
# vm.max_map_count of them (65,530 by default). A worker that compiles enough programs then
# fails inside LLVM ("Unable to allocate section memory"), a segfault or an abort (seven test
# runs lost a worker so, the first five put down to the compilation cache). The compiled
# programs are released when the count passes half the limit.
def _map_limit():
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except OSError:  # not Linux: no such limit to watch
        return None


_MAP_LIMIT = _map_limit()


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    yield
    if _MAP_LIMIT is not None:
        with open("/proc/self/maps") as f:
            mappings = sum(1 for _ in f)
        if mappings > _MAP_LIMIT // 2:
            jax.clear_caches()
