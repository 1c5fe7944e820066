"""What one small XLA operation costs when it waits for the one before it, on the default device.

``python benchmarks/thunk_cost.py [--reps 300]``: jits chains of 1, 50 and 200 steps, each step
a sum over 64 floats fed back into the next (an ``optimization_barrier`` keeps XLA from merging
them), and prints the median time of each chain, the number of fused operations XLA compiled for
it, and the cost per step beyond the one-step chain. After the pass over the logits, jsample runs
some three hundred such operations per call (README, "Benchmarks"), so this cost, not their
arrays, bounds that part of the sampler on a CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax


def chain(steps: int):
    def run(x):
        for i in range(steps):
            x = x + lax.optimization_barrier(jnp.sum(x * (i + 1.0)) * 1e-9)
        return x

    return jax.jit(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=300)
    args = parser.parse_args()
    x = jnp.arange(64.0)
    chains = {steps: chain(steps) for steps in (1, 50, 200)}
    times: dict[int, list[float]] = {steps: [] for steps in chains}
    for _ in range(args.reps):  # interleaved, so that the machine's noise hits every chain alike
        for steps, fn in chains.items():
            fn(x).block_until_ready()
            start = time.perf_counter()
            fn(x).block_until_ready()
            times[steps].append(time.perf_counter() - start)
    one = statistics.median(times[1])
    print(f"device: {jax.devices()[0].device_kind}")
    for steps, fn in chains.items():
        median = statistics.median(times[steps])
        fusions = fn.lower(x).compile().as_text().count(" fusion(")
        extra = (median - one) / max(steps - 1, 1)
        print(f"{steps:4d} steps: {median * 1e6:8.1f} us, {fusions:4d} fusions, "
              f"{extra * 1e6:5.2f} us per step beyond the first")


if __name__ == "__main__":
    main()
