"""The two control styles of jsample.control, side by side in one process on the default device.

``python benchmarks/styles.py [--rows 64] [--vocab 128256] [--reps 15]``: compiles
``sampling._sample_rows`` once per style (parameter values are traced: one program serves every
configuration), checks that both styles draw the same tokens, and prints the median ms of each
style and of the floor (one jitted ``max``) for each configuration of the benchmark grid, with
and without per-row parameters (``candidates`` 64 throughout, so per-row ``top_k`` above 64
take the wider tiers). On a GPU this is the A/B behind the default style there
(benchmarks/results/gpu_styles.md); on the CPU "straight" is the slower.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import jsample as js
from jsample import benchmark, control, sampling, validation
from jsample.params import FIELD_DTYPES


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args(argv)
    b = args.rows
    x = jax.device_put(jnp.asarray(benchmark.make_logits(b, args.vocab, "peaked")))
    u = jax.device_put(jnp.linspace(0.01, 0.99, b, dtype=jnp.float32))
    floor = jax.jit(lambda v: jnp.max(v, axis=-1))
    off = (jnp.ones((b,)), jnp.zeros((b,), jnp.int32), jnp.ones((b,)), jnp.zeros((b,)))
    programs = {}
    for style in control.STYLES:
        start = time.perf_counter()
        programs[style] = jax.jit(
            lambda u, x, *p, style=style: sampling._sample_rows(
                u, x, *p, rule="inclusive", count=64, style=style)
        ).lower(u, x, *off).compile()
        print(f"{style}: compiled in {time.perf_counter() - start:.1f} s", flush=True)
    print(f"\n{jax.devices()[0].device_kind}, B={b}, V={args.vocab}, float32 peaked logits; median ms")
    print("| config | floor | " + " | ".join(control.STYLES) + " |")
    print("|---|---|" + "---|" * len(control.STYLES))
    for per_row in (False, True):
        for cfg in benchmark.CONFIGS:
            params = benchmark.per_row_params(cfg, b, 64) if per_row else js.SamplingParams(
                temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p)
            values = [jax.device_put(validation.broadcast_param(name, getattr(params, name), (b,), dtype))
                      for name, dtype in FIELD_DTYPES.items()]
            tokens = {s: jax.block_until_ready(p(u, x, *values))[0] for s, p in programs.items()}
            assert all(bool((t == tokens["branches"]).all()) for t in tokens.values()), cfg.name
            times = {name: [] for name in ("floor", *programs)}
            for _ in range(args.reps):
                for name in times:
                    run = (lambda: floor(x)) if name == "floor" else (lambda n=name: programs[n](u, x, *values))
                    start = time.perf_counter()
                    jax.block_until_ready(run())
                    times[name].append(time.perf_counter() - start)
            med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
            label = cfg.name + (", per-row" if per_row else "")
            print(f"| {label} | " + " | ".join(f"{med[n]:.3f}" for n in times) + " |", flush=True)


if __name__ == "__main__":
    main()
