"""Benchmark suite: jsample against the floor (one pass over the logits) and its peers.

Run ``python -m jsample bench`` (or ``python benchmarks/run.py``). Every cell of the grid times,
on the same logits in the same process, interleaved round by round so that machine noise hits all
of them alike (the JAX implementations first, then the torch ones, whose spinning OpenMP
workers would otherwise slow the JAX runs that follow them; each timed call follows an untimed
one of the same implementation):

* ``floor``: one jitted ``max`` over the logits, the cost of reading them once;
* ``jsample``: ``jax.jit(js.sample)``, its parameter values put on the device once (as a
  decode loop holds them);
* ``jsample-rows``: the same with per-row parameters spread around the configuration's (see
  :func:`per_row_params`; ``candidates`` at least the largest ``top_k``), one compiled program
  for the whole spread;
* ``jax``: the obvious JAX pipeline (``lax.top_k`` or a full sort for top-p, softmax, cumsum
  mask, ``jax.random.categorical``);
* ``hf-flax``: transformers' Flax warpers (``transformers<5``) and ``jax.random.categorical``;
* ``torch-seed``: the seed article's per-row PyTorch ``do_sampling`` (:mod:`jsample.reference`);
* ``torch-fast``: the best plain-torch pipeline (``torch.topk`` first, softmax, cumsum mask,
  ``torch.multinomial``), batched.

On a GPU (``--device gpu``) the torch peers run on CUDA when torch has it, and each timed torch
call ends with ``torch.cuda.synchronize()``, as each JAX call ends with ``block_until_ready``.

Medians and ratios to the floor are printed as a markdown table with the device, the versions
and the date. Peers that cannot run a configuration (no min-p warper in Flax) show ``n/a``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import jsample as js


@dataclass(frozen=True)
class Config:
    name: str
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0


CONFIGS = (
    Config("greedy", temperature=0.0),
    Config("temperature", temperature=0.7),
    Config("top-k 50", temperature=0.7, top_k=50),
    Config("top-p 0.9", top_p=0.9),
    Config("top-k 50 + top-p 0.9", temperature=0.7, top_k=50, top_p=0.9),
    Config("min-p 0.05", min_p=0.05),
)
IMPLS = ("floor", "jsample", "jsample-rows", "jax", "hf-flax", "torch-seed", "torch-fast")


def make_logits(rows: int, vocab: int, profile: str, seed: int = 0) -> np.ndarray:
    """float32 ``[rows, vocab]``: "peaked" is Zipf-like and permuted per row, "flat" is N(0, 3)."""
    rng = np.random.default_rng(seed)
    if profile == "flat":
        return rng.normal(0.0, 3.0, (rows, vocab)).astype(np.float32)
    base = -1.5 * np.log(np.arange(1, vocab + 1))
    out = np.empty((rows, vocab), np.float32)
    for r in range(rows):
        out[r] = rng.permutation(base + rng.normal(0.0, 0.5, vocab))
    return out


# ---------------------------------------------------------------------------- implementations
def _on_device(params: js.SamplingParams) -> js.SamplingParams:
    """The parameter values as device arrays, put there once: a decode loop holds them so, and
    a Python scalar or NumPy array argument would be copied to the device on every call."""
    return jax.tree.map(jax.device_put, params)


def _jsample(cfg: Config, candidates: int):
    params = _on_device(js.SamplingParams(temperature=cfg.temperature, top_k=cfg.top_k,
                                          top_p=cfg.top_p, min_p=cfg.min_p, candidates=candidates))
    fn = jax.jit(lambda key, x, p: js.sample(key, x, p))
    return lambda key, x: fn(key, x, params)


def per_row_params(cfg: Config, rows: int, candidates: int) -> js.SamplingParams:
    """Per-row values spread evenly around ``cfg``'s: temperature +-10%, top_k +-50%, top_p
    +-0.05 (at most 0.99), min_p +-50%; filters that ``cfg`` leaves off stay off per row.

    ``candidates`` is raised to the power of two at or above the largest ``top_k``, as the
    documentation of :class:`jsample.SamplingParams` asks of per-row ``k``.
    """
    spread = np.linspace(-1.0, 1.0, rows) if rows > 1 else np.zeros(1)
    f32 = lambda a: np.asarray(a, np.float32)
    top_k = np.round(cfg.top_k * (1 + 0.5 * spread)).astype(np.int32)
    largest = int(top_k.max())
    if largest > candidates:
        candidates = 1 << (largest - 1).bit_length()
    return js.SamplingParams(
        temperature=f32(cfg.temperature * (1 + 0.1 * spread)),
        top_k=top_k,
        top_p=f32(np.minimum(cfg.top_p + 0.05 * spread, 0.99) if cfg.top_p < 1 else np.ones(rows)),
        min_p=f32(cfg.min_p * (1 + 0.5 * spread)),
        candidates=candidates,
    )


def _jsample_rows(cfg: Config, rows: int, candidates: int):
    params = _on_device(per_row_params(cfg, rows, candidates))
    fn = jax.jit(lambda key, x, p: js.sample(key, x, p))
    return lambda key, x: fn(key, x, params)


def _jax_obvious(cfg: Config):
    """What a JAX user writes by hand: top_k (or a full sort), softmax, cumsum mask, categorical."""

    @jax.jit
    def run(key, x):
        x = x.astype(jnp.float32)
        if cfg.temperature == 0:
            return jnp.argmax(x, axis=-1)
        x = x / cfg.temperature
        if cfg.min_p > 0:
            probs = jax.nn.softmax(x, axis=-1)
            keep = probs >= cfg.min_p * probs.max(axis=-1, keepdims=True)
            return jax.random.categorical(key, jnp.where(keep, x, -jnp.inf))
        if cfg.top_k == 0 and cfg.top_p >= 1:
            return jax.random.categorical(key, x)
        k = cfg.top_k or x.shape[-1]
        values, indices = jax.lax.top_k(x, k)
        if cfg.top_p < 1:
            cum = jnp.cumsum(jax.nn.softmax(values, axis=-1), axis=-1)
            values = jnp.where(cum - jax.nn.softmax(values, axis=-1) < cfg.top_p, values, -jnp.inf)
        choice = jax.random.categorical(key, values)
        return jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0]

    return run


def _hf_flax(cfg: Config):
    try:
        from transformers.generation import flax_logits_process as hf
    except Exception:  # transformers absent or without its Flax warpers
        return None
    if cfg.min_p > 0:
        return None
    warpers = []
    if cfg.temperature not in (0.0, 1.0):
        warpers.append(hf.FlaxTemperatureLogitsWarper(cfg.temperature))
    if cfg.top_k:
        warpers.append(hf.FlaxTopKLogitsWarper(cfg.top_k))
    if cfg.top_p < 1:
        warpers.append(hf.FlaxTopPLogitsWarper(cfg.top_p))

    @jax.jit
    def run(key, x):
        x = x.astype(jnp.float32)
        if cfg.temperature == 0:
            return jnp.argmax(x, axis=-1)
        for warp in warpers:
            x = warp(None, x, 0)
        return jax.random.categorical(key, x)

    return run


def _torch_seed(cfg: Config):
    import torch

    from jsample import reference

    top_p = cfg.top_p if cfg.top_p < 1 else 0.0  # the seed's "off" is top_p <= 0
    temperature = cfg.temperature if cfg.temperature > 0 else 1.0

    def run(generator, x):
        if cfg.temperature == 0:
            return torch.argmax(x, dim=-1)
        return reference.seed_sample(x, temperature, cfg.top_k, top_p, generator=generator)

    return run if cfg.min_p == 0 else None


def _torch_fast(cfg: Config):
    import torch

    def run(generator, x):
        x = x.float()
        if cfg.temperature == 0:
            return torch.argmax(x, dim=-1)
        x = x / cfg.temperature
        if cfg.min_p > 0:
            probs = torch.softmax(x, dim=-1)
            probs = probs * (probs >= cfg.min_p * probs.amax(dim=-1, keepdim=True))
            return torch.multinomial(probs, 1, generator=generator)[:, 0]
        if cfg.top_k == 0 and cfg.top_p >= 1:
            return torch.multinomial(torch.softmax(x, dim=-1), 1, generator=generator)[:, 0]
        if cfg.top_k:
            values, indices = torch.topk(x, cfg.top_k, dim=-1)
        else:
            values, indices = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(values, dim=-1)
        if cfg.top_p < 1:
            cum = torch.cumsum(probs, dim=-1)
            probs = probs * (cum - probs < cfg.top_p)
        choice = torch.multinomial(probs, 1, generator=generator)
        return torch.gather(indices, -1, choice)[:, 0]

    return run


# --------------------------------------------------------------------------------- timing
def _timer(impl: str, cfg: Config, x_np: np.ndarray, dtype: str, device, candidates: int
           ) -> Callable[[], None] | None:
    """A zero-argument callable that runs ``impl`` once and waits for its result, or None."""
    if impl in ("torch-seed", "torch-fast"):
        try:
            import torch
        except ImportError:
            return None
        fn = (_torch_seed if impl == "torch-seed" else _torch_fast)(cfg)
        if fn is None:
            return None
        # Torch runs where JAX runs: on CUDA when the cell is timed on a GPU and torch has one.
        on_gpu = device is not None and device.platform == "gpu" and torch.cuda.is_available()
        where = "cuda" if on_gpu else "cpu"
        x = torch.from_numpy(x_np).to(where)
        x = x.to(torch.bfloat16) if dtype == "bf16" else x
        generator = torch.Generator(device=where).manual_seed(0)
        if on_gpu:
            return lambda: (fn(generator, x), torch.cuda.synchronize())
        return lambda: fn(generator, x)
    x = jax.device_put(jnp.asarray(x_np, jnp.bfloat16 if dtype == "bf16" else jnp.float32), device)
    key = jax.device_put(jax.random.key(0), device)
    if impl == "floor":
        fn = jax.jit(lambda k, v: jnp.max(v, axis=-1))
    elif impl == "jsample":
        fn = _jsample(cfg, candidates)
    elif impl == "jsample-rows":
        fn = _jsample_rows(cfg, x_np.shape[0], candidates)
    elif impl == "jax":
        fn = _jax_obvious(cfg)
    else:
        fn = _hf_flax(cfg)
        if fn is None:
            return None
    return lambda: jax.block_until_ready(fn(key, x))


def time_cell(cfg: Config, rows: int, vocab: int, dtype: str, profile: str, impls=IMPLS,
              reps: int = 7, budget_s: float = 20.0, device=None, candidates: int = 64) -> dict:
    """Median seconds per implementation for one cell, runs interleaved round by round (the
    JAX implementations, then the torch ones); each timed call follows an untimed one of the same
    implementation.

    An implementation whose call (after compilation) takes longer than ``budget_s / (2 * reps)``
    gets fewer rounds (at least 3), so the slowest peers do not dominate the wall time; ``runs``
    says how many.
    """
    x_np = make_logits(rows, vocab, profile)
    timers = {name: _timer(name, cfg, x_np, dtype, device, candidates) for name in impls}
    times: dict[str, list[float]] = {name: [] for name, t in timers.items() if t is not None}
    limit: dict[str, int] = {}
    for name in times:
        timers[name]()  # compile and warm up
        # The budget goes by a compiled call: timing the first one would count the compilation
        # and cut a quick but slow-to-compile program (jsample's) to the minimum of rounds.
        start = time.perf_counter()
        timers[name]()
        call = time.perf_counter() - start
        limit[name] = reps if 2 * call * reps < budget_s else 3
    # JAX runs first, then torch: torch's OpenMP workers keep spinning after each call and, on
    # a small machine, would slow whatever JAX program ran next (measured: up to 2x).
    groups = [[n for n in times if not n.startswith("torch")], [n for n in times if n.startswith("torch")]]
    for group in groups:
        for round_ in range(reps):
            for name in group:
                if round_ < limit[name]:
                    # An untimed call first: a peer's multi-GB sort just before leaves the heap
                    # trimmed, and the first call after it pays for page faults that are not its
                    # own (measured: 8.6 ms against 5.6 ms for jsample on the min-p cell).
                    timers[name]()
                    start = time.perf_counter()
                    timers[name]()
                    times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(ts), "runs": len(ts)} for name, ts in times.items()}


def environment(device) -> dict:
    versions = {"jax": jax.__version__, "jsample": js.__version__, "numpy": np.__version__}
    for mod in ("torch", "transformers", "flax"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = "absent"
    dev = device or jax.devices()[0]
    if versions["torch"] != "absent" and dev.platform == "gpu":
        import torch

        if torch.cuda.is_available():  # the torch peers then run on CUDA too (see _timer)
            versions["torch"] += f" on CUDA ({torch.cuda.get_device_name()})"
    return {
        "date": datetime.date.today().isoformat(),
        "device": f"{dev.platform}: {getattr(dev, 'device_kind', '')}",
        "machine": f"{platform.processor() or platform.machine()}, {jax.local_device_count()} JAX device(s)",
        "versions": versions,
    }


def table(results: list[dict], env: dict) -> str:
    """Markdown: one line per cell, median milliseconds and the ratio to the floor."""
    head = [f"Measured {env['date']} on {env['device']} ({env['machine']}); "
            + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + ".", "",
            "| B | V | dtype | logits | config | " + " | ".join(IMPLS) + " |",
            "|---|---|---|---|---|" + "---|" * len(IMPLS)]
    for r in results:
        floor = r["times"]["floor"]["median_s"]
        cells = []
        for name in IMPLS:
            t = r["times"].get(name)
            if t is None:
                cells.append("n/a")
            elif name == "floor":
                cells.append(f"{t['median_s'] * 1e3:.2f} ms")
            else:
                cells.append(f"{t['median_s'] * 1e3:.2f} ms ({t['median_s'] / floor:.1f}x)")
        head.append(f"| {r['rows']} | {r['vocab']} | {r['dtype']} | {r['profile']} | {r['config']} | "
                    + " | ".join(cells) + " |")
    return "\n".join(head)


def plot(results: list[dict], path: str, config: str = "top-k 50 + top-p 0.9") -> None:
    """Time vs vocabulary size for one configuration (largest batch, float32, peaked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [r for r in results if r["config"] == config and r["dtype"] == "f32"
              and r["profile"] == "peaked"]
    if not chosen:
        return
    rows = max(r["rows"] for r in chosen)
    chosen = sorted((r for r in chosen if r["rows"] == rows), key=lambda r: r["vocab"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in IMPLS:
        pts = [(r["vocab"], r["times"][name]["median_s"] * 1e3) for r in chosen if name in r["times"]]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("vocabulary size")
    ax.set_ylabel("median time per call (ms)")
    ax.set_title(f"{config}, B={rows}, float32, peaked logits")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jsample bench", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256, 256000])
    parser.add_argument("--dtype", nargs="+", default=["f32", "bf16"], choices=["f32", "bf16"])
    parser.add_argument("--profile", nargs="+", default=["peaked", "flat"], choices=["peaked", "flat"])
    parser.add_argument("--config", nargs="+", default=[c.name for c in CONFIGS],
                        choices=[c.name for c in CONFIGS], metavar="CONFIG")
    parser.add_argument("--impl", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--reps", type=int, default=7, help="timed rounds per cell (default 7)")
    parser.add_argument("--candidates", type=int, default=64, help="SamplingParams.candidates")
    parser.add_argument("--device", default=None, help="cpu, gpu or tpu (default: JAX's default)")
    parser.add_argument("--quick", action="store_true", help="one small cell per config (a smoke run)")
    parser.add_argument("--out", default=None, help="write the markdown table and a JSON file here")
    parser.add_argument("--plot", default=None, help="write a PNG of time vs vocabulary size here")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.vocab, args.dtype, args.profile, args.reps = [4], [4096], ["f32"], ["peaked"], 3
    device = jax.devices(args.device)[0] if args.device else None

    from tqdm import tqdm

    cells = [(c, b, v, d, p) for c in CONFIGS if c.name in args.config for v in args.vocab
             for b in args.rows for d in args.dtype for p in args.profile]
    results = []
    for cfg, rows, vocab, dtype, profile in tqdm(cells, desc="benchmark", unit="cell", file=sys.stderr):
        times = time_cell(cfg, rows, vocab, dtype, profile, impls=["floor", *[i for i in args.impl if i != "floor"]],
                          reps=args.reps, device=device, candidates=args.candidates)
        results.append({"config": cfg.name, "rows": rows, "vocab": vocab, "dtype": dtype,
                        "profile": profile, "times": times})
    env = environment(device)
    text = table(results, env)
    print(text)
    if args.out:
        with open(args.out + ".md", "w") as f:
            f.write(text + "\n")
        with open(args.out + ".json", "w") as f:
            json.dump({"env": env, "results": results}, f, indent=1)
    if args.plot:
        plot(results, args.plot)
    return 0
