"""Sort-free selection over a vocabulary: chunk maxima, exact top candidates, argmax, bisection.

Everything here reads a ``[rows, vocab]`` float32 array laid out as ``[rows, chunks, chunk]``.
Reductions over short contiguous chunks are as fast as one ``max`` pass on XLA's CPU backend, while
``lax.top_k`` and sorts over a full vocabulary are one to three orders of magnitude slower.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

FMAX = float(jnp.finfo(jnp.float32).max)
LOWEST = -FMAX
_CHUNK_SIZES = (64, 128, 32, 256)


class Layout(NamedTuple):
    """A ``[rows, vocab]`` float32 array padded with ``-inf`` to ``chunks * chunk`` columns."""

    x: jax.Array  # [N, chunks * chunk]
    vocab: int
    chunk: int
    chunks: int
    chunk_max: jax.Array  # [N, chunks]

    @property
    def blocks(self) -> jax.Array:
        return self.x.reshape(self.x.shape[0], self.chunks, self.chunk)

    def gather_chunks(self, chunk_ids: jax.Array) -> jax.Array:
        """``[N, M]`` chunk ids -> ``[N, M, chunk]`` values."""
        return jnp.take_along_axis(self.blocks, chunk_ids[..., None], axis=1)


def chunk_size(vocab: int) -> int:
    """A chunk length that divides the vocabulary when one does, so no padded copy is made."""
    if vocab <= _CHUNK_SIZES[0]:
        return vocab
    for size in _CHUNK_SIZES:
        if vocab % size == 0:
            return size
    return _CHUNK_SIZES[0]


def sanitize_logits(x: jax.Array) -> jax.Array:
    """NaN -> -inf and +inf -> the largest finite float32.

    NaN logits count as removed tokens; ``+inf`` becomes the largest finite value so that
    differences to the row maximum stay finite (several ``+inf`` entries tie for the top).
    """
    return jnp.where(jnp.isnan(x), -jnp.inf, jnp.minimum(x, FMAX))


def is_clean(layout: Layout) -> jax.Array:
    """True when no row holds NaN or +inf.

    +inf shows in the chunk maxima, NaN does not: XLA:CPU's vectorised (YNNPACK) max reduction
    drops NaN, and can return a wrong maximum for a chunk holding one. A sum always propagates
    NaN, so one sum pass catches it. Its only false alarm, a sum that overflows to inf - inf,
    merely sends the block down the sanitising path, which gives the same results.
    """
    return jnp.all(layout.chunk_max < jnp.inf) & ~jnp.isnan(jnp.sum(layout.x))


def make_layout(x: jax.Array) -> Layout:
    rows, vocab = x.shape
    chunk = chunk_size(vocab)
    chunks = -(-vocab // chunk)
    if chunks * chunk != vocab:
        x = jnp.pad(x, ((0, 0), (0, chunks * chunk - vocab)), constant_values=-jnp.inf)
    chunk_max = x.reshape(rows, chunks, chunk).max(axis=-1)
    return Layout(x, vocab, chunk, chunks, chunk_max)


def first_argmax(layout: Layout, row_max: jax.Array) -> jax.Array:
    """Index of the first maximum of each row (an all ``-inf`` row gives 0), int32 ``[N]``.

    ``jnp.argmax`` is a variadic reduction that runs ~20x slower than ``max`` on CPU; this finds
    the first chunk holding the maximum from the chunk maxima, then the position inside it.
    """
    chunk_ids = jnp.arange(layout.chunks, dtype=jnp.int32)
    first_chunk = jnp.min(
        jnp.where(layout.chunk_max == row_max[:, None], chunk_ids, layout.chunks - 1), axis=-1
    )
    block = layout.gather_chunks(first_chunk[:, None])[:, 0]
    offsets = jnp.arange(layout.chunk, dtype=jnp.int32)
    offset = jnp.min(jnp.where(block == row_max[:, None], offsets, layout.chunk - 1), axis=-1)
    return jnp.minimum(first_chunk * layout.chunk + offset, layout.vocab - 1)


def top_candidates(layout: Layout, count: int) -> tuple[jax.Array, jax.Array]:
    """The ``count`` largest values of each row, descending, with their indices.

    Exact by a two-stage search: every one of the ``count`` largest values lies in one of the
    ``count`` chunks with the largest maxima, so ``lax.top_k`` only runs over the chunk maxima
    and over those chunks. Equal values may be returned in any order.
    """
    rows = layout.x.shape[0]
    if count >= layout.chunks:
        values, indices = _top_k(layout.x, count)
        return values, indices.astype(jnp.int32)
    _, chunk_ids = _top_k(layout.chunk_max, count)
    flat_ids = (chunk_ids[..., None] * layout.chunk + jnp.arange(layout.chunk)).reshape(rows, -1)
    pool = layout.gather_chunks(chunk_ids).reshape(rows, -1)
    values, positions = _top_k(pool, count)
    indices = jnp.take_along_axis(flat_ids, positions, axis=-1)
    return values, indices.astype(jnp.int32)


def _top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``lax.top_k`` behind a barrier: XLA's CPU backend lowers top-k to a full sort plus a slice
    and only restores its fast TopK kernel when nothing fuses into that slice.

    One barrier per output: a barrier over the top-k tuple itself crashes XLA's CPU compiler
    (TopkDecomposer) when the program is partitioned, e.g. inside ``jax.shard_map``."""
    values, indices = lax.top_k(x, k)
    return lax.optimization_barrier(values), lax.optimization_barrier(indices)


def _to_order(v: jax.Array) -> jax.Array:
    """float32 -> uint32 whose unsigned order is the float order."""
    bits = lax.bitcast_convert_type(v, jnp.uint32)
    sign = bits >> 31
    return jnp.where(sign == 1, ~bits, bits | jnp.uint32(0x80000000))


def _from_order(o: jax.Array) -> jax.Array:
    bits = jnp.where(o >> 31 == 1, o & jnp.uint32(0x7FFFFFFF), ~o)
    return lax.bitcast_convert_type(bits, jnp.float32)


def smallest_true(
    predicate: Callable[[jax.Array], jax.Array], upper: jax.Array, active: jax.Array
) -> jax.Array:
    """Per row, the smallest float ``v`` in ``[LOWEST, upper]`` with ``predicate(v)`` true.

    ``predicate`` maps ``[N]`` candidate values to ``[N]`` booleans and must be monotone (false
    below some value, true above). Bisection over the float bit patterns: exact after at most 32
    passes, with no sort. A row whose predicate never holds returns ``upper``; an inactive row
    skips the search and returns ``LOWEST``.
    """
    hi = _to_order(upper)
    lo = jnp.where(active, _to_order(jnp.full_like(upper, LOWEST)), hi)

    def unfinished(state):
        lo, hi = state
        return jnp.any(lo < hi)

    def step(state):
        lo, hi = state
        open_ = lo < hi  # converged rows must not move: lo = mid + 1 would pass hi
        mid = lo + (hi - lo) // 2
        ok = predicate(_from_order(mid))
        return jnp.where(open_ & ~ok, mid + 1, lo), jnp.where(open_ & ok, mid, hi)

    _, hi = lax.while_loop(unfinished, step, (lo, hi))
    return jnp.where(active, _from_order(hi), LOWEST)
