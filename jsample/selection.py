"""Sort-free selection over a vocabulary: chunk maxima, thresholds, compaction, argmax, bisection.

Everything here reads a ``[rows, vocab]`` array cut into chunks whose maxima are known: runs of
consecutive tokens (:func:`make_layout`) or strided columns (:func:`make_strided_layout`). What
is cheap on XLA's CPU backend shapes the code:

* a ``max`` or ``sum`` over short contiguous chunks runs as fast as one ``max`` pass over the
  logits (a YNNPACK reduction), but its ``max`` drops NaN, and it does not fuse its elementwise
  producer: ``sum(exp(x))`` first writes ``exp(x)`` to memory, so passes that transform the
  logits run over row blocks (:func:`map_row_blocks`) to keep that temporary small;
* an elementwise loop of ``jnp.maximum`` down strided columns is as fast, and sees NaN;
* ``lax.top_k`` costs about 20 µs per row for ``k = 64``, whatever the row length, and sorts
  cost more; :func:`compact` and :func:`bisect_threshold` select without either;
* three-dimensional broadcasts such as ``[rows, n, thresholds]`` are materialised and slow, so
  searches evaluate one threshold per row and step.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jsample import control

FMAX = float(jnp.finfo(jnp.float32).max)
LOWEST = -FMAX
_CHUNK_SIZES = (64, 128, 32, 256)
# The fast sampler's chunk length, the group of chunks its threshold search runs on, and the
# runs of tokens inside a chunk that its last compaction works on.
FINE_CHUNK = 64
GROUP_ELEMENTS = 256
RUN = 8
# Entries per block of compact's block-located form, used where a row has at least
# slots * COMPACT_BLOCK entries (8 measured best in the sampler, against 4 and 16).
COMPACT_BLOCK = 8
# Tokens per chunk of a strided layout (make_strided_layout).
STRIDED_CHUNK = 16
# Row blocks of about this many bytes of float32 values: XLA's CPU backend materialises the
# operand of a reduction, and glibc maps a temporary above its 32 MiB threshold afresh (and
# page-faults it) on every call.
BLOCK_BYTES = 4 << 20


class Layout(NamedTuple):
    """A ``[rows, vocab]`` array padded with ``-inf`` to ``chunks * chunk`` columns, cut into
    chunks whose maxima are known.

    A chunk is ``chunk`` consecutive tokens, or, in a strided layout (:func:`make_strided_layout`),
    the tokens ``c, c + chunks, c + 2 * chunks, ...``: the columns of the row seen as
    ``[chunk, chunks]``. Any partition serves the searches over chunk maxima; what needs tokens
    in vocabulary order asks :meth:`chunk_tokens`, and the draw reads consecutive tokens
    (:attr:`draw_chunk`) whatever the partition.

    ``x`` keeps the dtype it was built from (float32 unless the caller built it from another
    float type; every consumer promotes to float32); ``chunk_max`` is float32.
    """

    x: jax.Array  # [N, chunks * chunk]
    vocab: int
    chunk: int
    chunks: int
    chunk_max: jax.Array  # [N, chunks]
    strided: bool = False
    # [N, groups]: group_max(self), when computed once up front (strided layouts).
    groups_max: jax.Array | None = None
    # [n] int32: for a layout of some of the rows (take_rows), the row of ``x`` each one reads.
    # ``x`` stays whole; ``chunk_max`` and ``groups_max`` are those rows' own.
    row_ids: jax.Array | None = None

    @property
    def own_x(self) -> jax.Array:
        """This layout's rows of ``x`` (a copy for a layout of some rows: short rows only)."""
        return self.x if self.row_ids is None else self.x[self.row_ids]

    def take_rows(self, ids: jax.Array) -> "Layout":
        """The layout of rows ``ids`` ([n] int32): their maxima are gathered, the logits are not
        (the consumers read them through gathers that :attr:`row_ids` points at)."""
        row_ids = ids if self.row_ids is None else self.row_ids[ids]
        groups_max = None if self.groups_max is None else self.groups_max[ids]
        return self._replace(chunk_max=self.chunk_max[ids], groups_max=groups_max, row_ids=row_ids)

    @property
    def blocks(self) -> jax.Array:
        """``[N, chunks, chunk]``: the chunks of a layout that is not strided."""
        return self.x.reshape(self.x.shape[0], self.chunks, self.chunk)

    @property
    def draw_chunk(self) -> int:
        """The length of the runs of consecutive tokens that the draw and the mass sums read."""
        return FINE_CHUNK if self.strided else self.chunk

    @property
    def draw_blocks(self) -> jax.Array:
        """``[N, width / draw_chunk, draw_chunk]``: the row in runs of :attr:`draw_chunk` tokens."""
        return self.x.reshape(self.x.shape[0], -1, self.draw_chunk)

    def chunk_tokens(self, chunk_ids: jax.Array) -> jax.Array:
        """``[N, M]`` chunk ids -> int32 ``[N, M, chunk]`` token ids, increasing along the last axis."""
        offsets = jnp.arange(self.chunk, dtype=jnp.int32)
        if self.strided:
            return chunk_ids[..., None] + offsets * self.chunks
        return chunk_ids[..., None] * self.chunk + offsets

    def chunk_values(self, chunk_ids: jax.Array) -> jax.Array:
        """``[N, M]`` chunk ids (in range) -> float32 ``[N, M, chunk]`` values."""
        if self.strided:
            # One index per value: a strided chunk is not a slice.
            return self.token_values(self.chunk_tokens(chunk_ids))
        return gather_rows(self.blocks, chunk_ids, self.row_ids).astype(jnp.float32)

    def token_values(self, tokens: jax.Array) -> jax.Array:
        """int32 ``[N, ...]`` token ids (in range) of each row -> their float32 values."""
        rows, width = self.x.shape
        row_ids = jnp.arange(rows, dtype=jnp.int32) if self.row_ids is None else self.row_ids
        flat = row_ids.reshape(-1, *(1,) * (tokens.ndim - 1)) * width + tokens
        values = self.x.reshape(-1).at[flat.reshape(-1)].get(mode="promise_in_bounds")
        return values.reshape(tokens.shape).astype(jnp.float32)


def gather_rows(a: jax.Array, ids: jax.Array, row_ids: jax.Array | None = None) -> jax.Array:
    """``a[n, ids[n, m], :]`` for ``a`` ``[N, R, C]`` and in-range ``ids`` ``[N, M]`` -> ``[N, M, C]``.

    One contiguous slice per id, gathered from the flattened array: several times faster on CPU
    than ``take_along_axis``, whose gather computes an index per element. With ``row_ids``
    ([n] int32), row ``i`` of ``ids`` reads row ``row_ids[i]`` of ``a``.
    """
    rows, r, c = a.shape
    if row_ids is None:
        row_ids = jnp.arange(rows, dtype=jnp.int32)
    flat = (row_ids[:, None] * r + ids).reshape(-1)
    return a.reshape(rows * r, c).at[flat].get(mode="promise_in_bounds").reshape(*ids.shape, c)


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
    NaN, so one sum over the logits catches it, at the cost of a second pass (the sampler reads
    NaN off its own exp pass when it makes one, see ``sampling._sample_rows``). Its only false
    alarm, a sum that overflows to inf - inf, merely sends the block down the sanitising path,
    which gives the same results.
    """
    return below_infinity(layout) & ~jnp.isnan(nan_sum(layout))


def below_infinity(layout: Layout) -> jax.Array:
    """True when no chunk maximum is +inf (NaN is not seen here: see :func:`is_clean`)."""
    # The barrier keeps XLA from merging this max with the reduction that made chunk_max into
    # one more pass over the logits.
    return jnp.max(lax.optimization_barrier(layout.chunk_max)) < jnp.inf


def nan_sum(layout: Layout) -> jax.Array:
    """The sum of all logits: NaN when one is NaN (a pass over the logits)."""
    return jnp.sum(layout.x)


def _tree_reduce(a: jax.Array, op, identity: float, axis: int = -1) -> jax.Array:
    """``op`` over ``axis`` by pairwise halving, padded with ``identity`` to a power of two."""
    axis = axis % a.ndim
    size = 1 << max(a.shape[axis] - 1, 0).bit_length()
    if size != a.shape[axis]:
        pad = [(0, 0)] * a.ndim
        pad[axis] = (0, size - a.shape[axis])
        a = jnp.pad(a, pad, constant_values=identity)
    while a.shape[axis] > 1:
        half = a.shape[axis] // 2
        a = op(lax.slice_in_dim(a, 0, half, axis=axis), lax.slice_in_dim(a, half, 2 * half, axis=axis))
    return jnp.squeeze(a, axis)


def tree_sum_axis(a: jax.Array, axis: int) -> jax.Array:
    """:func:`tree_sum` over ``axis``: the same pairwise order, adding whole slices of ``a``
    (for a middle axis, blocks that XLA vectorises along the axes after it)."""
    return _tree_reduce(a, jnp.add, 0.0, axis)


def tree_max(a: jax.Array) -> jax.Array:
    """Max over the last axis by pairwise halving (elementwise ops, no reduction).

    For the narrow arrays after the pass over the logits (candidate slots, groups of chunks):
    XLA:CPU hands every reduction of 4096 elements or more to YNNPACK, whose dispatch costs more
    than such a reduction's work. Wide rows (all the chunks) reduce faster with YNNPACK.
    """
    return _tree_reduce(a, jnp.maximum, -jnp.inf)


def tree_min(a: jax.Array) -> jax.Array:
    """Min over the last axis by pairwise halving (see :func:`tree_max`)."""
    return _tree_reduce(a, jnp.minimum, jnp.inf)


def make_layout(x: jax.Array, chunk: int | None = None) -> Layout:
    """Chunk maxima of ``x`` ``[N, V]``; ``chunk`` defaults to :func:`chunk_size`.

    Pads with ``-inf`` (a copy) only when ``chunk`` does not divide the vocabulary.
    """
    rows, vocab = x.shape
    chunk = chunk_size(vocab) if chunk is None else min(chunk, vocab)
    chunks = -(-vocab // chunk)
    if chunks * chunk != vocab:
        x = jnp.pad(x, ((0, 0), (0, chunks * chunk - vocab)), constant_values=-jnp.inf)
    chunk_max = x.reshape(rows, chunks, chunk).max(axis=-1).astype(jnp.float32)
    return Layout(x, vocab, chunk, chunks, chunk_max)


def make_strided_layout(x: jax.Array) -> Layout:
    """A strided layout of float32 ``x`` ``[N, V]`` (``V`` a multiple of :data:`FINE_CHUNK`).

    Chunk ``c`` holds the tokens ``c + i * V / STRIDED_CHUNK``: its maximum is the maximum down
    column ``c`` of the row seen as ``[STRIDED_CHUNK, V / STRIDED_CHUNK]``, which XLA computes as
    one vectorised loop of ``jnp.maximum`` over whole rows of that view, about as fast as one
    ``max`` pass over the logits. Unlike XLA:CPU's ``max`` reduction (YNNPACK), ``jnp.maximum``
    propagates NaN, so the chunk maxima reveal NaN (:func:`nan_probe`) without a second pass.
    float32 only: on bfloat16 the same loop converts one element at a time and runs ~6x slower.
    """
    rows, vocab = x.shape
    if x.dtype != jnp.float32 or vocab % FINE_CHUNK:
        raise ValueError(f"a strided layout needs float32 logits and a vocabulary divisible "
                         f"by {FINE_CHUNK}, got {x.dtype} and {vocab}")
    columns = vocab // STRIDED_CHUNK
    chunk_max = down_columns(x.reshape(rows, STRIDED_CHUNK, columns), jnp.maximum)
    layout = Layout(x, vocab, STRIDED_CHUNK, columns, chunk_max, strided=True)
    # The group maxima once, by a reduction: its operand, the loop's output, is stored once (an
    # elementwise consumer would copy the loop into itself and read the logits again), and every
    # consumer reads the [N, groups] result rather than recomputing it from the [N, chunks] one.
    groups, per_group = group_shape(layout)
    grouped = pad_columns(chunk_max, groups * per_group, -jnp.inf).reshape(rows, groups, per_group)
    return layout._replace(groups_max=jnp.max(grouped, axis=-1))


def down_columns(a: jax.Array, op) -> jax.Array:
    """``[N, S, W]`` -> ``[N, W]`` (``S`` a power of two): ``op`` down the middle axis by pairwise
    halving, which XLA fuses with ``a``'s producer into one elementwise loop vectorised along
    ``W``. With ``jnp.maximum`` it propagates NaN, unlike XLA:CPU's ``max`` reduction."""
    while a.shape[1] > 1:
        half = a.shape[1] // 2
        a = op(a[:, :half], a[:, half:])
    return a[:, 0]


def nan_probe(layout: Layout) -> jax.Array:
    """NaN when some logit of a strided layout is NaN (its chunk maxima propagate NaN).

    A plain sum of the chunk maxima: an elementwise step before it would be fused with the loop
    that makes them, which XLA would then run a second time over the logits. Its false alarms,
    ``-inf`` maxima beside ``+inf`` ones (``+inf`` is caught on its own anyway) or a sum that
    overflows both ways, merely send the batch down the sanitising path, which gives the same
    results.
    """
    return jnp.sum(layout.chunk_max)


def fine_chunk(vocab: int) -> int | None:
    """The fast sampler's chunk length for ``vocab``, or None when it would need padding."""
    return FINE_CHUNK if vocab % FINE_CHUNK == 0 else None


def group_shape(layout: Layout) -> tuple[int, int]:
    """``(groups, chunks_per_group)``: the groups of consecutive chunks of :func:`group_max`."""
    per_group = max(1, GROUP_ELEMENTS // layout.chunk)
    return -(-layout.chunks // per_group), per_group


def group_max(layout: Layout) -> tuple[jax.Array, int]:
    """Maxima of groups of consecutive chunks (about :data:`GROUP_ELEMENTS` tokens each).

    Returns ``(group_max [N, groups], chunks_per_group)``; the chunk maxima are padded with
    ``-inf`` to whole groups.
    """
    groups, per_group = group_shape(layout)
    if layout.groups_max is not None:
        return layout.groups_max, per_group
    rows = layout.chunk_max.shape[0]
    # The barrier keeps XLA from merging this with the reduction that made chunk_max into one
    # reduction over the logits, which would read them a second time. Pairwise maxima, not a
    # reduction: XLA:CPU hands a reduction of this size to YNNPACK, whose dispatch costs more
    # than the work (measured 72 us against 40 us at [64, 2004]).
    padded = pad_columns(lax.optimization_barrier(layout.chunk_max), groups * per_group, -jnp.inf)
    return tree_max(padded.reshape(rows, groups, per_group)), per_group


def pad_columns(a: jax.Array, width: int, value) -> jax.Array:
    """Pads the last axis of ``a`` to ``width`` with ``value`` (no copy when already wide)."""
    if a.shape[-1] == width:
        return a
    pad = [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])]
    return jnp.pad(a, pad, constant_values=value)


def _first_position(hits: jax.Array) -> jax.Array:
    """The first true position along the last axis (the last position when none), int32."""
    positions = jnp.arange(hits.shape[-1], dtype=jnp.float32)
    return tree_min(jnp.where(hits, positions, hits.shape[-1] - 1.0)).astype(jnp.int32)


def first_argmax(layout: Layout, row_max: jax.Array) -> jax.Array:
    """Index of the first maximum of each row (an all ``-inf`` row gives 0), int32 ``[N]``.

    ``jnp.argmax`` is a variadic reduction that runs ~20x slower than ``max`` on CPU, and so do
    integer reductions; this narrows down with float ``min`` reductions over positions: the
    first group of chunks holding the maximum (long rows), the first chunk in it, the position.
    """
    if layout.strided:
        return _strided_first_argmax(layout, row_max)
    rows = row_max.shape[0]
    target = row_max[:, None]
    if layout.chunks > GROUP_ELEMENTS:
        maxima, per_group = group_max(layout)
        group = _first_position(maxima == target)
        chunk_max = pad_columns(layout.chunk_max, maxima.shape[1] * per_group, -jnp.inf)
        chunk_max = jnp.take_along_axis(
            chunk_max.reshape(rows, -1, per_group), group[:, None, None], axis=1
        )[:, 0]
        chunk = jnp.minimum(group * per_group + _first_position(chunk_max == target), layout.chunks - 1)
    else:
        chunk = _first_position(layout.chunk_max == target)
    offset = _first_position(layout.chunk_values(chunk[:, None])[:, 0] == target)
    return jnp.minimum(chunk * layout.chunk + offset, layout.vocab - 1)


def _strided_first_argmax(layout: Layout, row_max: jax.Array) -> jax.Array:
    """:func:`first_argmax` on a strided layout.

    The chunks holding the maximum may interleave in vocabulary order, so the first maximum is
    the smallest token holding it among all of them: read from the chunks of the first group
    holding it. That is exact when no other group holds it, or when the token found lies in the
    first ``chunks`` tokens (a later group's tokens there come after it, its others after
    those). Rows past both (the maximum tied in several groups and found only further on) take
    one scan of the vocabulary, in a branch that runs only then.
    """
    rows = row_max.shape[0]
    target = row_max[:, None]
    maxima, per_group = group_max(layout)
    groups = maxima.shape[1]
    holds = maxima == target
    group = _first_position(holds)
    chunk_max = pad_columns(layout.chunk_max, groups * per_group, -jnp.inf)
    chunk_max = gather_rows(chunk_max.reshape(rows, groups, per_group), group[:, None])[:, 0]
    chunk_ids = jnp.minimum(group[:, None] * per_group + jnp.arange(per_group, dtype=jnp.int32),
                            layout.chunks - 1)
    hits = (layout.chunk_values(chunk_ids) == target[:, :, None]) & (chunk_max == target)[:, :, None]
    # Token ids as float32 (exact below 2**24) for a float min, much faster than an integer one.
    tokens = layout.chunk_tokens(chunk_ids).astype(jnp.float32)
    width = float(layout.x.shape[1])
    token = tree_min(jnp.where(hits, tokens, width).reshape(rows, -1))
    exact = (tree_sum(holds.astype(jnp.float32)) <= 1) | (token < layout.chunks)

    def scan():
        # Row blocks keep the operand of the min reduction (XLA stores it first) small; only
        # the blocks the inexact rows fill run.
        positions = jnp.arange(layout.x.shape[1], dtype=jnp.float32)
        first = map_row_blocks(
            lambda xb, tb: jnp.min(jnp.where(xb == tb[:, None], positions, width), axis=1),
            layout.x, target[:, 0], active=~exact,
        )
        return jnp.where(exact, token, first)

    token = control.run_if(~jnp.all(exact), scan, token)
    return jnp.minimum(token, layout.vocab - 1).astype(jnp.int32)


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
    flat_ids = layout.chunk_tokens(chunk_ids).reshape(rows, -1)
    pool = layout.chunk_values(chunk_ids).reshape(rows, -1)
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


def tree_sum(a: jax.Array) -> jax.Array:
    """Sum over the last axis by pairwise halving (zero-padded to a power of two).

    Elementwise adds in a fixed order, so a row's sum never depends on the batch size: XLA:CPU
    switches between two reduction emitters with the array size, and they round differently.
    """
    return _tree_reduce(a, jnp.add, 0.0)


def reduce_rows(a: jax.Array, kind: str) -> jax.Array:
    """``kind`` ("sum", "min" or "max") over the last axis: pairwise (:func:`tree_sum` and its
    kin) for rows of up to :data:`_NARROW_ROW` entries, where XLA:CPU's reduction (YNNPACK from
    4096 elements in all) costs more to dispatch than its work, e.g. 3 to 5 us of the 15 us of a
    search step over the group maxima; a reduction for wider rows."""
    if a.shape[-1] <= _NARROW_ROW:
        return {"sum": tree_sum, "min": tree_min, "max": tree_max}[kind](a)
    return {"sum": jnp.sum, "min": jnp.min, "max": jnp.max}[kind](a, axis=-1)


_NARROW_ROW = 1024


def chunk_sums(weights: Callable[[jax.Array], jax.Array], x: jax.Array, chunk: int) -> jax.Array:
    """Sums of ``weights(x)`` over consecutive chunks of ``chunk`` columns: float32 ``[N, V / chunk]``.

    ``weights`` is elementwise (e.g. ``exp``) and receives ``x`` as ``[N, V / chunk, chunk]``.
    XLA:CPU sums with its vectorised (YNNPACK) reduction from 4096 elements up and with another
    emitter below, and the two round differently; padding small inputs with zero rows keeps
    every row on the vectorised one, so a row's sums never depend on the batch size.
    """
    rows, vocab = x.shape
    return _vectorised_sums(weights(x.reshape(rows, vocab // chunk, chunk)))


def column_total(weights: Callable[[jax.Array], jax.Array], x: jax.Array, columns: int = 16) -> jax.Array:
    """Sum of ``weights(x)`` over each row in a fixed order: float32 ``[N]``.

    ``weights`` is elementwise and receives ``x`` (``[N, V]``, ``columns`` dividing ``V``, a
    power of two) as ``[N, columns, V / columns]``, summed down the middle axis by
    :func:`down_columns` (one elementwise loop, so ``weights`` is never stored) and then along
    the row as :func:`chunk_sums` sums, so the result never depends on the batch size.
    """
    rows, vocab = x.shape
    return _vectorised_sums(down_columns(weights(x.reshape(rows, columns, vocab // columns)), jnp.add))


# The operand size from which XLA:CPU reduces with YNNPACK (xla/backends/cpu/ynn_support.cc).
_VECTORISED_REDUCTION = 4096


def _vectorised_sums(w: jax.Array) -> jax.Array:
    """Sums of ``w`` ``[N, ...]`` over its last axis, on XLA:CPU's vectorised reduction whatever
    ``N``: rows of zeros are added while the operand is below :data:`_VECTORISED_REDUCTION`."""
    rows = w.shape[0]
    padded = max(rows, -(-_VECTORISED_REDUCTION // (w.size // rows)))
    if padded > rows:
        w = jnp.pad(w, ((0, padded - rows),) + ((0, 0),) * (w.ndim - 1))
    return jnp.sum(w, axis=-1)[:rows]


def materialize(v: jax.Array) -> jax.Array:
    """``v``, computed once into its own buffer.

    XLA's CPU fusion copies chains of cheap per-row operations into every consumer, so a
    threshold computed in twenty steps is recomputed for each element of each ``[rows, ...]``
    array compared with it. A reduction is never fused into its consumers: adding zeros through
    one stops that. The zeros are added to the bit pattern (an integer sum, exact), because
    XLA:CPU hands float reductions of 4096 elements or more to YNNPACK, at a dispatch cost.
    """
    bits = lax.bitcast_convert_type(v, jnp.int32) if v.dtype == jnp.float32 else v
    kept = jnp.sum(jnp.stack([bits, jnp.zeros_like(bits)]), axis=0, dtype=bits.dtype)
    return lax.bitcast_convert_type(kept, jnp.float32) if v.dtype == jnp.float32 else kept


def upper_triangle(n: int, strict: bool = False) -> jax.Array:
    """float32 ``[n, n]`` ones on and above (or strictly above) the diagonal.

    ``a @ upper_triangle(n)`` is the inclusive prefix sum of ``a`` along its last axis: a small
    matrix product is much faster on CPU than XLA's ``cumsum``.
    """
    return jnp.triu(jnp.ones((n, n), jnp.float32), 1 if strict else 0)


def prefix_sum(a: jax.Array, block: int = 16) -> jax.Array:
    """Inclusive prefix sums of float32 ``a`` ``[N, n]`` along the last axis.

    Sums inside blocks of ``block`` columns, then adds the totals of the earlier blocks (their
    prefix sums, recursively): small matrix products instead of an ``[n, n]`` one. Exact for
    counts below 2**24, the use here.
    """
    rows, n = a.shape
    if n <= 2 * block:
        return a @ upper_triangle(n)
    local, ends = block_prefix_sums(a, block)
    before = ends - local[:, :, -1]
    return (local + before[:, :, None]).reshape(rows, -1)[:, :n]


def block_prefix_sums(a: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """The two halves of :func:`prefix_sum` of ``a`` ``[N, n]``, zero-padded to whole blocks:
    ``local`` ``[N, blocks, block]``, the sums inside each block of ``block`` columns, and
    ``ends`` ``[N, blocks]``, the sums up to each block's end."""
    rows, n = a.shape
    blocks = -(-n // block)
    local = pad_columns(a, blocks * block, 0.0).reshape(rows, blocks, block) @ upper_triangle(block)
    # The block totals' prefix sums by the same method (a [blocks, blocks] triangle would be
    # 4 MB and a large product for the widest tier).
    return local, prefix_sum(local[:, :, -1], block)


def compact(flags: jax.Array, slots: int) -> tuple[jax.Array, jax.Array]:
    """The positions of the flagged entries of each row, in order, moved to the front.

    ``flags`` bool ``[N, n]``. Returns ``(source, count)``: ``source`` (int32 ``[N, slots]``)
    holds the positions of the first ``slots`` flagged entries, then 0; ``count`` (float32
    ``[N]``) is the number of flagged entries, which may exceed ``slots`` (the caller checks).
    The caller gathers what it needs from those positions (:func:`take_positions`) or computes
    it from them. No sort. Rows of at least ``slots * COMPACT_BLOCK`` entries locate each
    slot's entry by blocks (:func:`_compact_by_blocks`); shorter ones scatter: a prefix count
    gives every flagged entry its slot and one scatter writes its position. One scatter of
    positions rather than one per payload: XLA:CPU copies each payload into an
    ``[entries, 1]`` buffer for its scatter, a pass of its own.
    """
    rows, n = flags.shape
    if n >= slots * COMPACT_BLOCK:
        return _compact_by_blocks(flags, slots, COMPACT_BLOCK)
    position = prefix_sum(flags.astype(jnp.float32))
    count = position[:, -1]
    # One flat index per entry (no [entries, 2] index array); unflagged entries land in a
    # spare slot per row that is cut off afterwards.
    row_start = jnp.arange(rows, dtype=jnp.int32)[:, None] * (slots + 1)
    slot = row_start + jnp.where(flags, jnp.minimum(position - 1, slots), slots).astype(jnp.int32)
    entries = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (rows, n))
    source = (
        jnp.zeros((rows * (slots + 1),), jnp.int32)
        .at[slot.reshape(-1)].set(entries.reshape(-1), mode="promise_in_bounds")
        .reshape(rows, slots + 1)[:, :slots]
    )
    return source, count


def _compact_by_blocks(flags: jax.Array, slots: int, block: int) -> tuple[jax.Array, jax.Array]:
    """:func:`compact` without a scatter per entry: each slot finds its block, then its place.

    With ``E[b]`` the flagged entries up to the end of block ``b`` (of ``block`` entries), slot
    ``j``'s entry (0-based) lies in block ``h = #{b : E[b] <= j}``: a histogram of ``E`` (one
    scattered add per block) and a prefix sum over the slots. Inside block ``h`` it is the
    entry where the block's running count first exceeds ``j - (E[h] - flags in h)``. The work
    per row is about ``n / block + slots * block`` instead of ``n`` scattered writes.
    """
    rows = flags.shape[0]
    # Running counts inside each block, and the flagged entries up to each block's end.
    local, ends = block_prefix_sums(flags.astype(jnp.float32), block)
    blocks, totals = ends.shape[1], local[:, :, -1]
    count = ends[:, -1]
    # Blocks whose end count reaches past every slot go to a spare bin that is cut off.
    row_start = jnp.arange(rows, dtype=jnp.int32)[:, None] * (slots + 1)
    bins = row_start + jnp.minimum(ends, slots).astype(jnp.int32)
    hist = (
        jnp.zeros((rows * (slots + 1),), jnp.float32)
        .at[bins.reshape(-1)].add(1.0, mode="promise_in_bounds")
        .reshape(rows, slots + 1)[:, :slots]
    )
    home = jnp.minimum(prefix_sum(hist, block), blocks - 1).astype(jnp.int32)  # [rows, slots]
    before = jnp.take_along_axis(ends - totals, home, axis=1)
    rank = jnp.arange(slots, dtype=jnp.float32) - before  # 0-based among the block's flags
    inside = tree_sum((gather_rows(local, home) <= rank[:, :, None]).astype(jnp.float32))
    filled = jnp.arange(slots) < count[:, None]
    # Stored once: fused into each consumer's gather, the chain above would run per element.
    source = materialize(jnp.where(filled, home * block + inside.astype(jnp.int32), 0))
    return source, count


def take_positions(a: jax.Array, source: jax.Array) -> jax.Array:
    """``a[n, source[n, m]]`` for ``a`` ``[N, n, ...]`` flattened after its first axis and in-range
    ``source`` ``[N, M]``: one flat gather."""
    rows = a.shape[0]
    flat = a.reshape(rows, -1)
    index = jnp.arange(rows, dtype=jnp.int32)[:, None] * flat.shape[1] + source
    return flat.reshape(-1).at[index.reshape(-1)].get(mode="promise_in_bounds").reshape(source.shape)


def bisect_threshold(
    values: jax.Array, weights: jax.Array, target: jax.Array, upper: jax.Array,
    span: float = 64.0, steps: int = 12,
) -> jax.Array:
    """Per row, about the largest ``t`` in ``[upper - span, upper]`` with
    ``sum(weights[values >= t]) >= target``.

    ``values``/``weights`` ``[N, n]`` (weights >= 0), ``target``/``upper`` ``[N]``. Bisection on
    the value, ``steps`` passes over ``[N, n]``: the result is within ``span / 2**steps`` below
    the exact answer. Returns ``upper - span`` when even that misses the target; the caller
    checks what it needs of the result.
    """
    reaches = lambda t: reduce_rows(jnp.where(values >= t[:, None], weights, 0.0), "sum") >= target

    def step(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        ok = reaches(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    # A loop rather than unrolled steps: its result is materialised once, where XLA would
    # otherwise fuse the whole chain of steps into every consumer and recompute it per element.
    # Its trip count is known, so on a GPU it runs without going back to the host.
    lo, hi = lax.fori_loop(0, steps, step, (upper - span, upper))
    return jnp.where(reaches(hi), hi, lo)


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

    # 32 steps halve any span of float32 bit patterns to one.
    _, hi = control.until(unfinished, step, (lo, hi), most=32)
    return jnp.where(active, _from_order(hi), LOWEST)


def block_rows(rows: int, vocab: int) -> int:
    """Rows per block of about :data:`BLOCK_BYTES`: a divisor of ``rows``, so nothing is padded."""
    target = max(1, BLOCK_BYTES // (4 * vocab))
    if target >= rows:
        return rows
    return max(d for d in range(1, target + 1) if rows % d == 0)


def map_row_blocks(fn, x: jax.Array, *per_row, active: jax.Array | None = None):
    """``fn(x, *per_row)`` over blocks of rows (``lax.map``), results re-joined along rows.

    ``x`` is ``[N, V]``; every ``per_row`` array (or pytree of arrays) has ``N`` rows. Use it for
    passes that materialise a transform of the logits, so the temporary stays one block.
    bfloat16 ``x`` reaches ``fn`` as float32, converted block by block. With ``active`` ([N]
    bool), the active rows are taken first, so that only ``ceil(active / block)`` blocks run
    (the others give zeros), wherever those rows sit in the batch.
    """
    n, vocab = x.shape
    # Off the CPU the whole batch is one block: a loop over blocks would return to the host.
    size = n if control.straight() else block_rows(n, vocab)
    widen = x.dtype == jnp.bfloat16
    if widen:
        # XLA:CPU converts bfloat16 one element at a time, outside vectorised loops: given
        # bfloat16 blocks, it converts the whole array up front (a temporary of 32 MB at B=64,
        # V=128256) or, fused into the pass, slows the pass itself. Its bits go through the loop
        # as integers, and each block is converted into a buffer of its own (measured: an exp
        # pass over those logits 15.6 ms before, 4.3 ms so, 3.5 ms on float32 logits).
        x = lax.bitcast_convert_type(x, jnp.uint16)

    def block(xb, *rest):
        if widen:
            xb = lax.optimization_barrier(
                lax.bitcast_convert_type(xb, jnp.bfloat16).astype(jnp.float32)
            )
        return fn(xb, *rest)

    split = lambda a: a.reshape(n // size, size, *a.shape[1:])
    if active is None:
        if size == n:
            return block(x, *per_row)
        out = lax.map(lambda args: block(*args), jax.tree.map(split, (x, *per_row)))
        return jax.tree.map(lambda a: a.reshape(n, *a.shape[2:]), out)

    def zeros_for(run):
        shapes = jax.eval_shape(run)
        return lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    if size == n:
        run = lambda: block(x, *per_row)
        if control.straight():
            return _zero_rows(run(), active)
        return lax.cond(jnp.any(active), run, zeros_for(run))

    def rows_of(ids):
        # The rows are sliced, or gathered when not consecutive, inside the branch that runs
        # the block: taken outside, they would be copied into a buffer of their own to enter
        # it, whether or not the block runs; a slice is read in place by the pass.
        rest = jax.tree.map(lambda a: a[ids], per_row)
        sliced = lambda: block(lax.dynamic_slice_in_dim(x, ids[0], size), *rest)
        gathered = lambda: block(x.at[ids].get(mode="promise_in_bounds"), *rest)
        consecutive = jnp.all(ids == ids[0] + jnp.arange(size, dtype=jnp.int32))
        return lax.cond(consecutive, sliced, gathered)

    # The active rows first, so that only ceil(active / size) blocks run.
    return map_row_subsets(rows_of, active, size)


def map_row_subsets(fn, active: jax.Array, size: int):
    """``fn(ids)`` for blocks of ``size`` row ids, only as many blocks as the ``active`` rows fill.

    ``active`` is ``[N]`` bool; ``fn`` takes ``[size]`` int32 row ids and returns arrays (a
    pytree) with ``size`` leading rows. The active rows go first (a stable order otherwise), so
    ``ceil(active / size)`` blocks run; the rows of the blocks that do not run get zeros.
    Results come back in the batch's order. For work that reads the logits only through
    gathers (see :meth:`Layout.take_rows`), so that no block of logits is copied. In style
    ``"straight"`` (:mod:`jsample.control`), ``fn`` runs once, on all ``N`` rows in order.
    """
    n = active.shape[0]
    if control.straight():
        # One block of every row, in order: no loop, no branch (see jsample.control).
        return _zero_rows(fn(jnp.arange(n, dtype=jnp.int32)), active)
    order = jnp.argsort(~active, stable=True).astype(jnp.int32)
    shapes = jax.eval_shape(fn, order[:size])
    zeros = lambda ids: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    split = lambda a: a.reshape(n // size, size, *a.shape[1:])
    out = lax.map(
        lambda args: lax.cond(jnp.any(args[1]), fn, zeros, args[0]),
        (split(order), split(active[order])),
    )
    out = jax.tree.map(lambda a: a.reshape(n, *a.shape[2:]), out)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n, dtype=jnp.int32))
    return jax.tree.map(lambda a: a[inverse], out)


def _zero_rows(out, active: jax.Array):
    """``out`` (arrays with ``N`` leading rows) with the inactive rows zeroed."""
    def zero(a):
        mask = active.reshape(-1, *(1,) * (a.ndim - 1))
        return jnp.where(mask, a, jnp.zeros((), a.dtype))

    return jax.tree.map(zero, out)


def subset_rows(rows: int, target: int = 8) -> int:
    """Rows per block of :func:`map_row_subsets`: the largest divisor of ``rows`` up to ``target``."""
    return max(d for d in range(1, min(rows, target) + 1) if rows % d == 0)
