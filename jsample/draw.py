"""The draw: inverse-CDF sampling in vocabulary order from one uniform per row.

Given ``u`` in ``[0, 1)``, the token is the first index (in vocabulary order) whose cumulative
probability exceeds ``u``, the same rule as a PyTorch inverse-CDF over the same distribution, so
a run can be replayed token for token across frameworks. No random number is drawn per
vocabulary entry: the candidates path scans a few dozen kept tokens; the chunked path picks a
chunk by its mass, then a token inside it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsample.cutoff import Candidates, Rows


def pick(weights: jax.Array, target: jax.Array, cum: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """First position whose cumulative weight exceeds ``target``, per row.

    ``weights`` ``[N, M] >= 0`` (``cum``, their cumulative sum, when already known); returns
    ``(position [N], cumulative [N, M])``. When rounding leaves ``target`` at or above the
    total, the last positive weight is chosen, so a zero-weight position is never returned for
    a row with positive mass.
    """
    # A target below 0 (or NaN) would pick position 0 even when its weight is 0. The chunked draw
    # makes one by rounding: its in-chunk target ``target - before`` can come out slightly negative.
    target = jnp.where(target > 0, target, 0.0)
    cum = jnp.cumsum(weights, axis=-1) if cum is None else cum
    position = jnp.sum(cum <= target[:, None], axis=-1)
    slots = jnp.arange(weights.shape[-1], dtype=jnp.int32)
    last_positive = jnp.max(jnp.where(weights > 0, slots, 0), axis=-1)
    return jnp.minimum(position, last_positive).astype(jnp.int32), cum


def draw_candidates(rows: Rows, cands: Candidates, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Draws among each row's kept candidates; returns ``(token [N], logprob [N])``."""
    order = jnp.argsort(cands.indices, axis=1)
    indices = jnp.take_along_axis(cands.indices, order, axis=1)
    values = jnp.take_along_axis(cands.values, order, axis=1)
    keep = jnp.take_along_axis(cands.keep, order, axis=1)
    scaled = rows.scaled(values)
    weights = jnp.where(keep, jnp.exp(scaled), 0.0)
    total = jnp.sum(weights, axis=1)
    position, _ = pick(weights, u * total)
    token = jnp.take_along_axis(indices, position[:, None], axis=1)[:, 0]
    logprob = jnp.take_along_axis(scaled, position[:, None], axis=1)[:, 0] - jnp.log(total)
    return token, logprob


def draw_chunked(rows: Rows, threshold: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Exact draw over the whole vocabulary: a chunk by its mass, then a token inside it."""
    layout = rows.layout
    chunk_mass = jnp.sum(rows.weights(layout.blocks, threshold), axis=-1)
    # The total comes from the cumulative sum: a second reduction over the weights would make
    # XLA materialise them instead of fusing the exp into one pass.
    cum = jnp.cumsum(chunk_mass, axis=-1)
    total = cum[:, -1]
    target = u * total
    chunk, _ = pick(chunk_mass, target, cum)
    after = jnp.take_along_axis(cum, chunk[:, None], axis=1)[:, 0]
    before = after - jnp.take_along_axis(chunk_mass, chunk[:, None], axis=1)[:, 0]
    block = layout.gather_chunks(chunk[:, None])[:, 0]
    offset, _ = pick(rows.weights(block, threshold), target - before)
    token = chunk * layout.chunk + offset
    scaled = rows.scaled(jnp.take_along_axis(block, offset[:, None], axis=1))[:, 0]
    return token, scaled - jnp.log(total)
