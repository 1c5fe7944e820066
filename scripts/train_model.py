"""Trains the byte-level demo model shipped in ``jsample/model/weights.npz``.

The corpus is the Python language reference that ships with every CPython install
(``pydoc_data.topics``: about 430 KB of English prose, grammar and code once its ASCII tables
are dropped), so training needs no download. Random windows of ``window + 1`` bytes are cut
from the first 95% of the text; the last 5% is held out and its loss reported. AdamW with a
linear warm-up and a cosine decay.

The defaults train for a fixed number of steps, so the result does not depend on machine speed;
the run that produced the shipped weights used 375 CPU-seconds (stored in the file's
metadata with the held-out loss)::

    .venv/bin/python scripts/train_model.py                  # writes jsample/model/weights.npz
    .venv/bin/python scripts/train_model.py --steps 50 --out /tmp/w.npz   # a quick smoke run
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jsample.model import Config, Transformer, WEIGHTS, save


def corpus() -> bytes:
    """The Python language reference's topics, in a fixed order, as UTF-8 bytes.

    ASCII-art tables (lines starting with ``+-``, ``+=`` or ``|``, 8% of the text) are left out:
    a small model learns their long runs of spaces and reproduces them at length.
    """
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name].strip() for name in sorted(topics))
    lines = [line for line in text.split("\n") if not line.lstrip().startswith(("+-", "+=", "|"))]
    return "\n".join(lines).encode("utf-8")


def batches(data: np.ndarray, batch: int, length: int, rng: np.random.Generator):
    while True:
        starts = rng.integers(0, len(data) - length, batch)
        yield np.stack([data[s : s + length] for s in starts]).astype(np.int32)


def loss_fn(model: Transformer, chunk: jax.Array) -> jax.Array:
    logits = model(chunk[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, chunk[:, 1:]).mean()


@nnx.jit
def train_step(model: Transformer, optimizer: nnx.Optimizer, chunk: jax.Array) -> jax.Array:
    loss, grads = nnx.value_and_grad(loss_fn)(model, chunk)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def eval_loss(model: Transformer, chunk: jax.Array) -> jax.Array:
    return loss_fn(model, chunk)


def held_out_loss(model: Transformer, data: np.ndarray, window: int, batch: int) -> float:
    """Mean next-byte loss (nats) over consecutive windows of the held-out text."""
    count = (len(data) - 1) // window // batch * batch
    chunks = np.stack([data[i * window : i * window + window + 1] for i in range(count)])
    losses = [eval_loss(model, jnp.asarray(chunks[i : i + batch], jnp.int32))
              for i in range(0, count, batch)]
    return float(np.mean(losses))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(WEIGHTS))
    args = parser.parse_args(argv)

    config = Config()
    data = np.frombuffer(corpus(), np.uint8)
    split = int(0.95 * len(data))
    train, held_out = data[:split], data[split:]

    model = Transformer(config, rngs=nnx.Rngs(args.seed))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, warmup_steps=min(100, args.steps // 10), decay_steps=args.steps,
        end_value=args.lr / 20)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    params = sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    print(f"{params:,} parameters, {len(train):,} training bytes, {len(held_out):,} held out",
          file=sys.stderr)

    start, cpu_start = time.perf_counter(), time.process_time()
    stream = batches(train, args.batch, config.window + 1, np.random.default_rng(args.seed))
    for step in range(1, args.steps + 1):
        loss = train_step(model, optimizer, jnp.asarray(next(stream)))
        if step % 100 == 0 or step == args.steps:
            print(f"step {step:5d}  loss {float(loss):.3f}  {time.perf_counter() - start:6.0f}s",
                  file=sys.stderr)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    held = held_out_loss(model, held_out, config.window, args.batch)
    print(f"held-out loss {held:.3f} nats/byte ({held / math.log(2):.3f} bits/byte)",
          file=sys.stderr)
    save(model, args.out, corpus="pydoc_data.topics without tables", python=sys.version.split()[0],
         steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
         train_seconds=round(seconds), train_cpu_seconds=round(cpu_seconds),
         held_out_nats_per_byte=round(held, 4))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
