"""The draw: inverse-CDF sampling in vocabulary order from one uniform per row.

Given ``u`` in ``[0, 1)``, the token is the first index (in vocabulary order) whose cumulative
probability exceeds ``u``, the same rule as a PyTorch inverse-CDF over the same distribution, so
a run can be replayed token for token across frameworks. No random number is drawn per
vocabulary entry: the candidates path scans a few dozen kept tokens; the chunked path picks a
group of chunks by its mass, then a chunk in it, then a token. Every float sum runs in a fixed
order (``cumsum``, :func:`jsample.selection.tree_sum`), so a row's token and logprob never depend
on the batch size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsample import cutoff, selection
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
    slots = jnp.arange(weights.shape[-1], dtype=jnp.float32)
    position = selection.tree_sum((cum <= target[:, None]).astype(jnp.float32))
    last_positive = selection.tree_max(jnp.where(weights > 0, slots, 0.0))
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


def draw_sorted(rows: Rows, cands: Candidates, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """:func:`draw_candidates` for candidates already in token order (no sort)."""
    scaled = rows.scaled(cands.values)
    weights = jnp.where(cands.keep, jnp.exp(scaled), 0.0)
    cum = jnp.cumsum(weights, axis=-1)
    total = cum[:, -1]
    position, _ = pick(weights, u * total, cum)
    token = jnp.take_along_axis(cands.indices, position[:, None], axis=1)[:, 0]
    logprob = jnp.take_along_axis(scaled, position[:, None], axis=1)[:, 0] - jnp.log(total)
    return token, logprob


def draw_chunked(
    rows: Rows, threshold: jax.Array, u: jax.Array, active: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Exact draw over the whole vocabulary: a group of chunks by its mass, then a chunk, then a
    token.

    Tokens count when ``>= threshold`` (per row) and when they pass min-p. One ``exp`` pass gives
    the chunk masses (:func:`jsample.cutoff.draw_masses`); the rest reads one group of chunk
    masses and one chunk per row. Returns ``(token [N], logprob [N], mass [N])``: ``mass`` is
    each row's kept mass, NaN when the row's logits hold NaN. With ``active`` ([N] bool), only
    the active rows' results are meaningful (see :func:`jsample.cutoff.draw_masses`).
    """
    layout = rows.layout
    masses = cutoff.draw_masses(rows, threshold, active)  # [N, chunks]
    chunks = masses.shape[1]
    groups = -(-chunks // _GROUP)
    masses = selection.pad_columns(masses, groups * _GROUP, 0.0).reshape(-1, groups, _GROUP)
    group_mass = selection.tree_sum(masses)
    cum = jnp.cumsum(group_mass, axis=-1)
    total = cum[:, -1]
    target = u * total
    group, _ = pick(group_mass, target, cum)
    target = target - _before(cum, group_mass, group)
    chunk_mass = selection.gather_rows(masses, group[:, None])[:, 0]
    chunk_cum = jnp.cumsum(chunk_mass, axis=-1)
    offset, _ = pick(chunk_mass, target, chunk_cum)
    target = target - _before(chunk_cum, chunk_mass, offset)
    chunk = jnp.minimum(group * _GROUP + offset, chunks - 1)
    values = selection.gather_rows(layout.draw_blocks, chunk[:, None])[:, 0].astype(jnp.float32)
    position, _ = pick(rows.weights(values, threshold), target)
    token = chunk * layout.draw_chunk + position
    scaled = rows.scaled(jnp.take_along_axis(values, position[:, None], axis=1))[:, 0]
    return token, scaled - jnp.log(total), total


# Chunk masses per group in the whole-vocabulary draw.
_GROUP = 32


def _before(cum: jax.Array, weights: jax.Array, position: jax.Array) -> jax.Array:
    """The cumulative weight before ``position`` in each row."""
    at = lambda a: jnp.take_along_axis(a, position[:, None], axis=1)[:, 0]
    return at(cum) - at(weights)
