"""Sharded sampling vs gather-then-sample on a simulated 8-device CPU mesh.

    python benchmarks/sharding.py [--batch 16] [--vocab 131072] [--repeats 20]

For each mesh (data x model) and parameter mix, compares ``js.sample_sharded`` on bfloat16
logits sharded ``P("data", "model")`` with the usual alternative: all-gather the vocabulary (as
MaxText, JetStream and T5X do), then sample whole rows on each data shard. Prints one table row
per case:

* bytes in: what each device receives per call, read from the compiled HLO: an all-gather over a
  group of g devices brings (g-1)/g of its result, a ring all-reduce 2(g-1)/g of its size. The
  sharded program holds every path behind runtime branches; its collectives carry named scopes
  (see jsample/sharding.py), and only the scopes a mix runs are counted. The mixes here never
  reach the bisection tier (one psum per row per step, up to 64 steps).
* ms: median wall time per call. Eight simulated devices share this machine's cores, so the
  times show the compute each path does, not interconnect costs.
* tokens: whether both paths drew the same tokens (they should: same keys, same rule).

The simulated devices must exist before JAX starts, so this script sets XLA_FLAGS itself.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jsample as js  # noqa: E402

# Parameter mix -> how often each named scope of jsample/sharding.py runs its collectives (the
# bisection scope at most 32 steps per search: an upper bound).
MIXES = {
    "top-k 50, top-p 0.9": (
        js.SamplingParams(temperature=0.8, top_k=50, top_p=0.9),
        {"row_max": 1, "first_argmax": 1, "candidate_pool": 1},
    ),
    "top-p 0.9": (
        js.SamplingParams(temperature=0.8, top_p=0.9),
        {"row_max": 1, "first_argmax": 1, "softmax_mass": 1, "candidate_pool": 1},
    ),
    "temperature 0.8": (
        js.SamplingParams(temperature=0.8),
        {"row_max": 1, "first_argmax": 1, "chunked_draw": 1},
    ),
    "top-k 1000 (bisection tier)": (
        js.SamplingParams(temperature=0.8, top_k=1000),
        {"row_max": 1, "first_argmax": 1, "candidate_pool": 1, "bisection": 32, "chunked_draw": 1},
    ),
}
SCOPES = {"row_max", "first_argmax", "softmax_mass", "candidate_pool", "bisection", "chunked_draw"}

_COLLECTIVE = re.compile(
    r"=\s*(?P<type>.+?)\s+(?P<op>all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
    r"(?:-start)?\("
)
_ITEM_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1}


def group_size(line: str) -> int:
    """Devices per replica group, from ``{{0,1,2,3},...}`` or ``mesh['a'=2,'b'=4] {'b'}``."""
    explicit = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if explicit:
        return len(explicit.group(1).split(","))
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", mesh.group(1)))
    return math.prod(int(sizes[axis]) for axis in re.findall(r"'(\w+)'", mesh.group(2)))


def bytes_in(hlo: str, runs: dict[str, int] | None) -> tuple[int, int]:
    """``(bytes each device receives, collectives run)`` for one call.

    ``runs=None`` counts every collective once; otherwise a collective under a named scope
    counts ``runs[scope]`` times (0 if absent), and one outside every known scope (none today)
    once, which keeps the figure an upper bound.
    """
    total, count = 0, 0
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if not m:
            continue
        op_name = re.search(r'op_name="([^"]*)"', line)
        path = set(op_name.group(1).split("/")) if op_name else set()
        scoped = path & SCOPES
        times = 1 if runs is None or not scoped else runs.get(scoped.pop(), 0)
        group = group_size(line)
        size = sum(
            _ITEM_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
            for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group("type"))
        )
        share = (group - 1) / group * (2 if m.group("op") == "all-reduce" else 1)
        total += times * int(size * share)
        count += times
    return total, count


def lm_like_logits(batch: int, vocab: int) -> np.ndarray:
    """bfloat16 ``[batch, vocab]``: Zipf-like rows (probability ~ rank^-1.5, tokens shuffled per
    row), so a top-p 0.9 nucleus holds a few dozen tokens, as with a trained LM's logits."""
    rng = np.random.default_rng(0)
    ranks = np.argsort(rng.random((batch, vocab)), axis=1) + 1
    logits = -1.5 * np.log(ranks) + rng.normal(0.0, 0.1, (batch, vocab))
    return logits.astype(jnp.bfloat16)


def timed(fn, *args, repeats):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    host = lm_like_logits(args.batch, args.vocab)
    key = jax.random.key(0)
    print(f"batch {args.batch}, vocab {args.vocab}, bfloat16 logits, {jax.device_count()} "
          f"simulated {jax.devices()[0].platform.upper()} devices\n")
    print("| mesh (data x model) | mix | path | collectives | bytes in / device | ms | tokens |")
    print("|---|---|---|---:|---:|---:|---|")
    for shape in [(1, 8), (2, 4)]:
        # Auto axes let the baseline ask XLA for the gather with a sharding constraint.
        mesh = jax.make_mesh(shape, ("data", "model"), axis_types=(AxisType.Auto,) * 2)
        logits = jax.device_put(host, NamedSharding(mesh, P("data", "model")))
        rows = NamedSharding(mesh, P("data", None))

        def sharded(key, logits, params, mesh=mesh):
            return js.sample_sharded(key, logits, params, mesh=mesh)

        def gathered(key, logits, params, mesh=mesh, rows=rows):
            whole_rows = lax.with_sharding_constraint(logits, rows)
            return js.sample_sharded(key, whole_rows, params, mesh=mesh, vocab_axis=None)

        programs = {}
        for name, fn in (("gather-then-sample", gathered), ("sample_sharded", sharded)):
            jitted = jax.jit(fn)
            params = next(iter(MIXES.values()))[0]
            programs[name] = (jitted, jitted.lower(key, logits, params).compile().as_text())
        for mix, (params, runs) in MIXES.items():
            tokens = {}
            for name, (jitted, hlo) in programs.items():
                moved, ops = bytes_in(hlo, runs if name == "sample_sharded" else None)
                ms = timed(jitted, key, logits, params, repeats=args.repeats)
                tokens[name] = np.asarray(jitted(key, logits, params))
                same = "" if name != "sample_sharded" else (
                    "same" if np.array_equal(tokens[name], tokens["gather-then-sample"]) else "DIFFER"
                )
                bound = "≤ " if name == "sample_sharded" and max(runs.values()) > 1 else ""
                print(f"| {shape[0]} x {shape[1]} | {mix} | {name} | {bound}{ops} | {bound}{moved:,} | "
                      f"{ms:.2f} | {same} |")


if __name__ == "__main__":
    main()
