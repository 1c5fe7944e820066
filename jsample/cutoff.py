"""Which tokens each row keeps: the exact rules of temperature, top-k, top-p and min-p.

Every filter keeps a set that is closed upwards in logit value, so a row's kept set is always
``{token : logit >= threshold and prob >= min_p * max_prob}``. The rules, by value (ties are kept
or dropped together, so the result never depends on token order):

* top-k keeps a token when fewer than ``k`` tokens have a strictly larger logit;
* top-p ``"inclusive"`` keeps a token when the mass of strictly larger tokens is ``< top_p``;
  ``"exclusive"`` keeps it when the mass of tokens at least as large is ``<= top_p``; both keep
  the top token(s); masses are taken on the tempered, top-k-renormalised distribution;
* min-p keeps a token when ``exp((logit - max) / T) >= min_p``.

Each row takes the first tier that can prove its answer; all evaluate the same rules:

1. :func:`threshold_candidates` with ``candidates`` slots: a threshold ``L``, then every token
   ``>= L``, collected in vocabulary order by small compactions (groups, chunks, then the
   chunks' tokens: directly for the strided chunks of ``sample``, through runs of eight tokens
   for chunks of consecutive tokens), and the rules applied to them by pairwise comparisons.
   No sort, no ``top_k``. ``L`` comes from a short bisection over chunk or group maxima: for
   top-k rows, at least ``k`` maxima are ``>= L``; for rows with top-p and no top-k, the
   weights of the maxima ``>= L`` already reach ``top_p`` (:func:`mass_threshold`). The row is
   certified when all tokens ``>= L`` fit and some filter provably drops every token below
   ``L`` (top-k: at least ``k`` tokens are ``>= L``; top-p: their mass reaches ``top_p``;
   min-p: ``L`` itself fails the min-p test).
2. The same with 4, 16 and then 32 times the slots (:data:`TIER_WIDTHS`, the widest at most
   one slot per 64 tokens: :func:`tier_slots`; a tier with slots for every group's chunks
   skips the groups), for rows whose kept set is wider. A row tries a tier only when what it
   collects could fit there, and these tiers run only over the row blocks their rows fill
   (see :func:`resolve`).
3. :func:`full_thresholds`: an exact bisection over the whole vocabulary, in row blocks, only
   in as many blocks as its rows fill (:func:`selection.map_row_blocks`).

:func:`candidate_cutoff` (the ``lax.top_k`` candidate tier) serves the sharded sampler.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jsample import selection
from jsample.control import run_if
from jsample.selection import LOWEST, Layout, first_argmax, smallest_true, top_candidates

# Logit distance from the row maximum that the threshold search covers, per unit of temperature
# above 1: a kept set reaching further down takes a slower tier, never a wrong answer.
SEARCH_SPAN = 64.0
# The candidate tiers' slots, in multiples of ``candidates``: a row takes the first tier that
# holds its kept set, and the exact bisection over the vocabulary only past the last one.
TIER_WIDTHS = (1, 4, 16, 32)
# The wider tiers hold at most one slot per run of the draw's length (64 tokens), or this many:
# wider, a tier would gather a good part of the vocabulary; the bisection over it is then as
# cheap. They run by row blocks, so their temporaries are a block's.
_WIDEST_TIER_MIN = 256
# Up to this many candidate slots the rules run as pairwise comparisons.
_PAIRWISE_SLOTS = 128
# The largest gather of a tier's chunks that is stored before its run maxima are taken (see
# threshold_candidates).
STORED_GATHER_BYTES = selection.BLOCK_BYTES
# The threshold search counts on at least this many maxima per row when the row has them.
_SEARCH_ENTRIES = 256


class Rows(NamedTuple):
    """One sampling problem per row, after sanitising logits and parameters."""

    layout: Layout
    row_max: jax.Array  # [N] float32, 0 for rows without a finite logit
    temperature: jax.Array  # [N] float32 > 0 (1 for greedy rows, which never use it)
    top_k: jax.Array  # [N] int32
    top_p: jax.Array  # [N] float32
    min_p: jax.Array  # [N] float32
    greedy: jax.Array  # [N] bool: temperature == 0
    valid: jax.Array  # [N] bool: the row has a finite logit
    k_on: jax.Array  # [N] bool
    p_on: jax.Array  # [N] bool

    @property
    def filtered(self) -> jax.Array:
        """Rows that sample from a filtered distribution (not greedy, not plain softmax)."""
        return (self.k_on | self.p_on | (self.min_p > 0)) & ~self.greedy & self.valid

    def scaled(self, values: jax.Array) -> jax.Array:
        """``(logit - row max) / temperature``, the log of the unnormalised probability."""
        extra = (1,) * (values.ndim - 1)
        row_max = self.row_max.reshape(-1, *extra)
        temperature = self.temperature.reshape(-1, *extra)
        return (values - row_max) / temperature

    def keep(self, values: jax.Array, threshold: jax.Array) -> jax.Array:
        """The kept mask of ``values`` (``[N, ...]`` logits) for per-row ``threshold``."""
        extra = (1,) * (values.ndim - 1)
        min_p = self.min_p.reshape(-1, *extra)
        above = values >= threshold.reshape(-1, *extra)
        return above & (values > -jnp.inf) & (jnp.exp(self.scaled(values)) >= min_p)

    def weights(self, values: jax.Array, threshold: jax.Array) -> jax.Array:
        """Unnormalised probabilities of ``values`` (``[N, ...]``), zero where not kept.

        One ``exp`` per entry serves both the weight and the min-p test, so XLA fuses it into
        the reduction that consumes it. ``-inf`` logits get weight 0 without a test. A NaN
        logit fails both comparisons and keeps its weight, NaN: a sum of weights over the raw
        logits then reveals it (see :attr:`Resolution.nan_probe`).
        """
        extra = (1,) * (values.ndim - 1)
        weight = jnp.exp(self.scaled(values))
        dropped = (values < threshold.reshape(-1, *extra)) | (weight < self.min_p.reshape(-1, *extra))
        return jnp.where(dropped, 0.0, weight)

    @property
    def p_only(self) -> jax.Array:
        """Rows with top-p and no top-k: their top-p reads the mass of the whole vocabulary."""
        return self.p_on & ~self.k_on

    @property
    def mass_rows(self) -> jax.Array:
        """Rows whose top-p needs the mass of the whole vocabulary (:attr:`p_only`, not greedy).

        Decided by the parameters alone (invalid rows included), so that the exp pass that
        computes the mass runs whenever the parameters ask for it.
        """
        return self.p_only & ~self.greedy

    @property
    def unfiltered(self) -> jax.Array:
        """Rows that sample from the whole tempered distribution, by the parameters alone."""
        return ~(self.k_on | self.p_on | (self.min_p > 0)) & ~self.greedy

    def greedy_tokens(self) -> jax.Array:
        return first_argmax(self.layout, jnp.where(self.valid, self.row_max, -jnp.inf))


def prepare_rows(layout: Layout, temperature, top_k, top_p, min_p) -> Rows:
    """``layout``: sanitised logits; parameters: sanitised ``[N]``."""
    # The barrier keeps XLA from merging this max (a reduction for wide rows) with the reduction
    # that made the maxima into a second pass over the logits.
    maxima = layout.chunk_max if layout.groups_max is None else layout.groups_max
    row_max = selection.reduce_rows(lax.optimization_barrier(maxima), "max")
    valid = row_max > -jnp.inf
    # Each parameter is computed once into its own buffer, and the flags from those buffers:
    # XLA would otherwise copy the chains that sanitised them into every consumer.
    keep = selection.materialize
    temperature, top_k, top_p, min_p = map(keep, (temperature, top_k, top_p, min_p))
    greedy = temperature == 0
    vocab = layout.vocab
    return Rows(
        layout=layout,
        row_max=keep(jnp.where(valid, row_max, 0.0)),
        temperature=keep(jnp.where(greedy, 1.0, temperature)),
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        greedy=greedy,
        valid=valid,
        k_on=(top_k > 0) & (top_k < vocab),
        p_on=top_p < 1,
    )


class Candidates(NamedTuple):
    values: jax.Array  # [N, K] logits: descending (candidate_cutoff) or in token order
    indices: jax.Array  # [N, K] int32 token ids (increasing from threshold_candidates)
    keep: jax.Array  # [N, K] bool: kept by every filter
    threshold: jax.Array  # [N] smallest logit kept by top-k and top-p
    certified: jax.Array  # [N] bool: the whole kept set lies among the candidates


def _tie_groups(values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For descending ``values`` ``[N, K]``: first and last position of each entry's tie group."""
    k = values.shape[-1]
    pos = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), values.shape)
    starts = jnp.concatenate([jnp.ones_like(values[:, :1], bool), values[:, 1:] != values[:, :-1]], 1)
    ends = jnp.concatenate([values[:, 1:] != values[:, :-1], jnp.ones_like(values[:, :1], bool)], 1)
    first = lax.cummax(jnp.where(starts, pos, 0), axis=1)
    last = lax.cummin(jnp.where(ends, pos, k - 1), axis=1, reverse=True)
    return first, last


def candidate_cutoff(rows: Rows, count: int, rule: str, full_mass: jax.Array) -> Candidates:
    """Applies the rules to each row's ``count`` largest logits.

    ``full_mass`` is ``sum(exp(scaled))`` over the whole vocabulary, needed by rows with top-p
    and no top-k. A row is certified when its last candidate is not kept (so, the rules being
    monotone, no token outside the candidates is) and its top-p mass was exact.
    """
    count = min(count, rows.layout.vocab)
    values, indices = top_candidates(rows.layout, count)
    scaled = rows.scaled(values)
    weight = jnp.exp(scaled)
    finite = values > -jnp.inf
    first, last = _tie_groups(values)

    keep_k = ~rows.k_on[:, None] | (first < rows.top_k[:, None])
    kept_weight = jnp.where(keep_k & finite, weight, 0.0)
    cum = jnp.cumsum(kept_weight, axis=1)
    mass = jnp.where(rows.k_on, cum[:, -1], full_mass)
    if rule == "inclusive":
        exclusive_cum = jnp.concatenate([jnp.zeros_like(cum[:, :1]), cum[:, :-1]], axis=1)
        above = jnp.take_along_axis(exclusive_cum, first, axis=1)
        keep_p = above < rows.top_p[:, None] * mass[:, None]
    else:
        at_least = jnp.take_along_axis(cum, last, axis=1)
        keep_p = at_least <= rows.top_p[:, None] * mass[:, None]
    keep_p = ~rows.p_on[:, None] | keep_p | (first == 0)

    keep_kp = keep_k & keep_p & finite
    threshold = selection.tree_min(jnp.where(keep_kp, values, jnp.inf))
    keep = keep_kp & (weight >= rows.min_p[:, None])
    exact_mass = ~(rows.k_on & rows.p_on) | ~keep_k[:, -1]
    certified = (count == rows.layout.vocab) | (~keep[:, -1] & exact_mass)
    return Candidates(values, indices, keep, threshold, certified)


class TierThreshold(NamedTuple):
    """A candidate tier's per-row threshold ``L``, found before the tier runs."""

    threshold: jax.Array  # [N] float32: the tier collects every token >= threshold
    min_p_proof: jax.Array  # [N] bool: min-p alone drops every token below the threshold


def mass_threshold(rows: Rows, full_mass: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """For rows with top-p and no top-k: a threshold ``L`` whose tokens provably reach the mass.

    Each chunk whose maximum is ``>= L`` holds at least that maximum's weight, so the sum of
    those weights is a lower bound on the mass of the tokens ``>= L``. ``L`` is about the
    largest threshold at which that bound reaches ``top_p`` of the row's mass (with a margin
    for rounding): its tokens then always reach it too, and they are few, about as many as the
    row keeps. Counted on the tokens themselves for short rows.

    Returns ``(threshold [N], chunks [N], reached [N])``: ``chunks`` (float32) counts the
    chunks whose maximum is ``>= L``, the fewest slots a tier needs; ``reached`` is False where
    the bound misses even at the bottom of the searched span (no tier can certify that row).
    """
    layout = rows.layout
    if layout.chunks >= _SEARCH_ENTRIES or layout.chunks * layout.chunk > 4 * _SEARCH_ENTRIES:
        maxima = layout.chunk_max
    else:
        maxima = layout.own_x.astype(jnp.float32)
    finite = maxima > -jnp.inf
    weight = jnp.where(finite, jnp.exp(rows.scaled(maxima)), 0.0)
    target = rows.top_p * full_mass * (1 + _MASS_MARGIN)
    lowest = selection.reduce_rows(jnp.where(finite, maxima, rows.row_max[:, None]), "min")
    span = jnp.minimum(rows.row_max - lowest, SEARCH_SPAN * jnp.maximum(rows.temperature, 1.0))
    threshold = selection.materialize(
        selection.bisect_threshold(maxima, weight, target, rows.row_max, span)
    )
    above = maxima >= threshold[:, None]
    reached = selection.reduce_rows(jnp.where(above, weight, 0.0), "sum") >= target  # as searched
    chunks = jnp.sum((layout.chunk_max >= threshold[:, None]).astype(jnp.float32), axis=1)
    return threshold, chunks, reached


# The relative margin by which the mass bound of mass_threshold must pass top_p: the tier sums
# the same weights in another order.
_MASS_MARGIN = 1e-4


def tier_threshold(rows: Rows, slots: int, p_threshold: jax.Array) -> TierThreshold:
    """The threshold ``L`` of a tier with ``slots`` slots (see :func:`threshold_candidates`).

    For top-k rows, the largest L with at least k tokens at or above it, counted on group maxima
    for long rows (a maximum >= L is a token >= L, so the count is a lower bound), on chunk
    maxima or the tokens themselves when there are too few groups to count (or too few for the
    slots: a count that cannot reach its target leaves L far too low). For rows with top-p and
    no top-k, ``p_threshold`` (:func:`mass_threshold`, the same for every tier).
    """
    layout = rows.layout
    group_max, _ = selection.group_max(layout)
    groups = group_max.shape[1]
    if groups >= max(_SEARCH_ENTRIES, 2 * slots):
        maxima = group_max
    elif layout.chunks >= _SEARCH_ENTRIES or layout.chunks * layout.chunk > 4 * _SEARCH_ENTRIES:
        maxima = layout.chunk_max
    else:
        maxima = layout.own_x.astype(jnp.float32)

    def count_threshold():
        finite = maxima > -jnp.inf
        lowest = selection.reduce_rows(jnp.where(finite, maxima, rows.row_max[:, None]), "min")
        span = jnp.minimum(rows.row_max - lowest, SEARCH_SPAN * jnp.maximum(rows.temperature, 1.0))
        return selection.bisect_threshold(
            maxima, jnp.ones_like(maxima), rows.top_k.astype(jnp.float32), rows.row_max, span
        )

    # Costly: a loop of 12 steps, each a few kernel launches on a GPU.
    searched = run_if(jnp.any(rows.k_on), count_threshold, jnp.zeros_like(rows.row_max),
                      costly=True)
    threshold = jnp.where(rows.k_on, searched, jnp.where(rows.p_only, p_threshold, -jnp.inf))
    # min-p keeps exp((x - max) / T) >= min_p: x >= max + T log(min_p), less a margin for the
    # rounding of that expression (the exact test runs on the candidates).
    # Rows with top-k and top-p renormalise over the whole top-k set, so they must collect it:
    # min-p may not raise their threshold.
    margin = 1e-3 * rows.temperature + 1e-6 * jnp.abs(rows.row_max)
    min_p_cut = rows.row_max + rows.temperature * jnp.log(rows.min_p) - margin
    m_on = (rows.min_p > 0) & ~(rows.k_on & rows.p_on)
    threshold = selection.materialize(
        jnp.where(m_on, jnp.maximum(threshold, min_p_cut), threshold)
    )
    return TierThreshold(threshold, m_on & (jnp.exp(rows.scaled(threshold)) < rows.min_p))


class TierResult(NamedTuple):
    """What a candidate tier found (see :func:`threshold_candidates`)."""

    candidates: Candidates
    # [N] float32: the slots the row needs, a lower bound when its collection overflowed
    needed: jax.Array
    # [N] bool: some filter drops every token below the tier's threshold (top-k, top-p, min-p)
    proved: jax.Array


def threshold_candidates(rows: Rows, slots: int, rule: str, full_mass: jax.Array,
                         tier: TierThreshold) -> TierResult:
    """A candidate tier: every token at or above a per-row threshold, in vocabulary order.

    ``full_mass`` is ``sum(exp(scaled))`` over the vocabulary, read by rows with top-p and no
    top-k (ones elsewhere); ``tier`` is :func:`tier_threshold` for ``slots``.
    Returns candidates with ``slots`` entries: values (``-inf`` after the last one), token ids
    in increasing order, the kept flags, the top-k/top-p threshold and the certificate (see
    the module docstring).
    """
    layout = rows.layout
    n = rows.row_max.shape[0]
    threshold = tier.threshold
    group_max, per_group = selection.group_max(layout)
    groups = group_max.shape[1]
    p_only = rows.p_only
    at_least = lambda v: (v >= threshold.reshape(-1, *(1,) * (v.ndim - 1))) & (v > -jnp.inf)

    # Groups holding a token >= L, then their chunks holding one, then (chunks of consecutive
    # tokens) the runs of RUN tokens in those chunks holding one, then those tokens: three or
    # four compactions of small arrays. A tier with slots for the chunks of as many groups as
    # there are chunks compacts the chunks directly: the groups would only double the array.
    if slots * per_group < layout.chunks:
        group_id, group_count = selection.compact(at_least(group_max), slots)
        chunk_max = selection.pad_columns(layout.chunk_max, groups * per_group, -jnp.inf)
        chunk_max = selection.gather_rows(chunk_max.reshape(n, groups, per_group), group_id)
        chunk_max = _open_slots(group_count, chunk_max).reshape(n, -1)
        source, chunk_count = selection.compact(at_least(chunk_max), slots)
        group = jnp.take_along_axis(group_id, source // per_group, axis=1)
        chunk_id = group * per_group + source % per_group
    else:
        group_count = jnp.zeros((n,), jnp.float32)
        chunk_id, chunk_count = selection.compact(at_least(layout.chunk_max), slots)
    chunk_id = jnp.minimum(chunk_id, layout.chunks - 1)
    collect = _collect_strided if layout.strided else _collect_runs
    (values, indices), count, runs_needed = collect(layout, chunk_id, chunk_count, slots, at_least)
    needed = jnp.maximum(jnp.maximum(group_count, chunk_count), jnp.maximum(count, runs_needed))

    # Pairwise comparisons are cheapest for the usual slot counts; their [N, M, M] arrays
    # outgrow a bisection over the candidates for wide tiers.
    rules = _apply_rules if slots <= _PAIRWISE_SLOTS else _bisected_rules
    keep_kp, weight, mass = rules(rows, values, rule, full_mass)
    taken = selection.tree_sum(jnp.where(values > -jnp.inf, weight, 0.0))
    enough_p = taken >= rows.top_p * full_mass if rule == "inclusive" else taken > rows.top_p * full_mass
    proof = (rows.k_on & (count >= rows.top_k)) | (p_only & enough_p) | tier.min_p_proof
    cands = Candidates(
        values=values,
        indices=indices,
        keep=keep_kp & (weight >= rows.min_p[:, None]),
        threshold=selection.tree_min(jnp.where(keep_kp, values, jnp.inf)),
        certified=(needed <= slots) & proof,
    )
    return TierResult(cands, needed, proof)


def _open_slots(count: jax.Array, a: jax.Array) -> jax.Array:
    """``a`` ``[N, slots, ...]`` with the slots from ``count`` on (per row) set to ``-inf``."""
    n, slots = a.shape[:2]
    open_ = jnp.arange(slots) < count[:, None]
    return jnp.where(open_.reshape(n, slots, *(1,) * (a.ndim - 2)), a, -jnp.inf)


def _collect_runs(layout: Layout, chunk_id, chunk_count, slots: int, at_least):
    """The tokens ``>= L`` of the collected chunks of a layout of consecutive tokens, in
    vocabulary order: the runs of :data:`selection.RUN` tokens holding one, then their tokens.

    Returns ``((values, token ids) [N, slots] each, count [N], runs [N])``: the counts of
    tokens and runs ``>= L`` (float32), which may exceed ``slots``.
    """
    n = chunk_id.shape[0]
    run = selection.RUN if layout.chunk % selection.RUN == 0 else layout.chunk
    per_chunk = layout.chunk // run
    # The run maxima of the chunks collected. Fused into the maxima, the gather runs once per
    # run and token (~3x slower than gathering whole chunks into a buffer first); stored, the
    # [n, slots, chunk] array of the widest tier would be tens of MB, page-faulted afresh on
    # every call. So the chunks are gathered into a buffer only up to STORED_GATHER_BYTES.
    chunk_values = layout.chunk_values(chunk_id)
    if chunk_values.size * chunk_values.dtype.itemsize <= STORED_GATHER_BYTES:
        chunk_values = selection.materialize(chunk_values)
    run_max = selection.tree_max(
        _open_slots(chunk_count, chunk_values).reshape(n, slots * per_chunk, run)
    )
    run_id, run_count = selection.compact(at_least(run_max), slots)
    global_run = jnp.take_along_axis(chunk_id, run_id // per_chunk, axis=1) * per_chunk + run_id % per_chunk
    all_runs = layout.x.reshape(layout.x.shape[0], -1, run)
    runs = _open_slots(
        run_count, selection.gather_rows(all_runs, global_run, layout.row_ids).astype(jnp.float32)
    )
    source, count = selection.compact(at_least(runs).reshape(n, -1), slots)
    open_ = jnp.arange(slots) < count[:, None]
    token = jnp.take_along_axis(global_run, source // run, axis=1) * run + source % run
    found = (
        jnp.where(open_, selection.take_positions(runs, source), -jnp.inf),
        jnp.where(open_, token, 0),
    )
    return found, count, run_count


def _collect_strided(layout: Layout, chunk_id, chunk_count, slots: int, at_least):
    """:func:`_collect_runs` for a strided layout: the collected chunks' tokens directly.

    ``chunk_id`` is increasing, so the tokens ``c + i * chunks`` come in vocabulary order when
    taken by ``i`` first, then by chunk: gathered as ``[chunk, slots]``, in that order, so that
    nothing is transposed.
    """
    n = chunk_id.shape[0]
    tokens = jnp.swapaxes(layout.chunk_tokens(chunk_id), 1, 2)  # [n, chunk, slots]
    open_ = (jnp.arange(slots) < chunk_count[:, None])[:, None, :]
    values = selection.materialize(jnp.where(open_, layout.token_values(tokens), -jnp.inf))
    source, count = selection.compact(at_least(values).reshape(n, -1), slots)
    # Entry i * slots + j is token chunk_id[j] + i * chunks.
    token = jnp.take_along_axis(chunk_id, source % slots, axis=1) + (source // slots) * layout.chunks
    filled = jnp.arange(slots) < count[:, None]
    found = (
        jnp.where(filled, selection.take_positions(values, source), -jnp.inf),
        jnp.where(filled, token, 0),
    )
    return found, count, jnp.zeros((n,), jnp.float32)


def _bisected_rules(rows: Rows, values: jax.Array, rule: str, full_mass: jax.Array):
    """:func:`_apply_rules` by exact bisection over the candidates' values (no ``[M, M]`` array).

    The same rules: top-k keeps values with fewer than ``k`` strictly larger candidates, top-p
    the values whose mass above (inclusive) or at-or-above (exclusive) stays within
    ``top_p * mass``; both thresholds are found by :func:`selection.smallest_true`, whose
    predicates sum ``[N, M]`` arrays in a fixed order.
    """
    weight = jnp.exp(rows.scaled(values))
    present = values > -jnp.inf
    above = lambda v, w: selection.tree_sum(jnp.where(values > v[:, None], w, 0.0))
    k_threshold = smallest_true(
        lambda v: above(v, 1.0) < rows.top_k, rows.row_max, rows.k_on
    )
    keep_k = present & (values >= k_threshold[:, None])
    kept_weight = jnp.where(keep_k, weight, 0.0)
    mass = jnp.where(rows.k_on, selection.tree_sum(kept_weight), full_mass)
    budget = rows.top_p * mass
    if rule == "inclusive":
        predicate = lambda v: above(v, kept_weight) < budget
    else:
        predicate = lambda v: selection.tree_sum(
            jnp.where(values >= v[:, None], kept_weight, 0.0)
        ) <= budget
    p_threshold = smallest_true(predicate, rows.row_max, rows.p_on)
    return keep_k & (values >= p_threshold[:, None]), weight, mass


def _apply_rules(rows: Rows, values: jax.Array, rule: str, full_mass: jax.Array):
    """Top-k and top-p on candidate ``values`` ``[N, M]`` (any order, ``-inf`` for empty slots)
    that hold every token the row could keep.

    Pairwise comparisons replace the sort: a token's top-k rank is the number of strictly larger
    candidates, and the mass above it the sum of their weights.
    Returns ``(kept by top-k and top-p [N, M], weights [N, M], top-k mass [N])``.
    """
    weight = jnp.exp(rows.scaled(values))
    present = values > -jnp.inf
    # [n, j, i]: v_j > v_i, and for top-p v_j > v_i (inclusive) or v_j >= v_i (exclusive).
    larger = values[:, :, None] > values[:, None, :]
    above = larger if rule == "inclusive" else values[:, :, None] >= values[:, None, :]
    # The top-p masses may sum the weights before top-k: a candidate top-k keeps has every
    # candidate above it kept too (and a dropped one needs no top-p), so its sum is the same,
    # term for term, and the two sums need not wait for each other. Each is a tree over j (the
    # middle axis), whose levels add whole [n, half, M] blocks, vectorised along i.
    rank = selection.tree_sum_axis(jnp.where(larger, 1.0, 0.0), 1)
    above_mass = selection.tree_sum_axis(jnp.where(above, weight[:, :, None], 0.0), 1)
    keep_k = (~rows.k_on[:, None] | (rank < rows.top_k[:, None])) & present
    kept_weight = jnp.where(keep_k, weight, 0.0)
    # Masses in a fixed order (a matrix product may round differently with the batch size).
    mass = jnp.where(rows.k_on, selection.tree_sum(kept_weight), full_mass)
    budget = (rows.top_p * mass)[:, None]
    keep_p = above_mass < budget if rule == "inclusive" else above_mass <= budget
    keep_p = ~rows.p_on[:, None] | keep_p | (rank == 0)
    return keep_k & keep_p, weight, mass


def map_rows(fn, rows: Rows, *per_row, active: jax.Array | None = None):
    """``fn(rows_block, *per_row_block)`` over row blocks (see :func:`selection.map_row_blocks`).

    For passes that materialise a transform of the logits, e.g. ``exp``: the block keeps that
    temporary small. ``fn`` returns arrays with one leading row axis. With ``active`` ([N]
    bool), only the blocks the active rows fill run (see :func:`selection.map_row_blocks`);
    the rows left out get zeros.
    """
    layout = rows.layout
    fields = rows._replace(layout=layout.chunk_max)

    def block(x, fields, *extra):
        part = fields._replace(layout=layout._replace(x=x, chunk_max=fields.layout, groups_max=None))
        return fn(part, *extra)

    return selection.map_row_blocks(block, layout.x, fields, *per_row, active=active)


def draw_masses(rows: Rows, threshold: jax.Array | None = None,
                active: jax.Array | None = None) -> jax.Array:
    """float32 ``[N, width / draw_chunk]``: the unnormalised probability mass of each run of
    :attr:`selection.Layout.draw_chunk` consecutive tokens, the draw's chunks.

    Tokens count when ``>= threshold`` (per row; all of them when None) and when they pass
    min-p. One ``exp`` pass over the logits in row blocks, summed in a fixed order (see
    :func:`selection.chunk_sums`), so a row's masses never depend on the rest of the batch.
    With ``active`` ([N] bool), only the blocks the active rows fill run: only the active
    rows' masses may be read (the rows left out get zeros).
    """
    chunk = rows.layout.draw_chunk
    if threshold is None:
        # The select keeps the exp out of XLA's vectorised reduction, which runs exp on one
        # core at a fraction of the speed of XLA's own loop. NaN keeps its weight, NaN.
        weights = lambda r: lambda v: jnp.where(v == -jnp.inf, 0.0, jnp.exp(r.scaled(v)))
        return map_rows(
            lambda r: selection.chunk_sums(weights(r), r.layout.x, chunk), rows, active=active
        )
    return map_rows(
        lambda r, t: selection.chunk_sums(lambda v: r.weights(v, t), r.layout.x, chunk),
        rows,
        threshold,
        active=active,
    )


def chunk_masses(rows: Rows) -> jax.Array:
    """float32 ``[N, sets]``: the unnormalised probability mass of each chunk of the layout, or,
    for a strided layout, of each group of chunks (:func:`selection.group_max`).

    For a strided layout, one ``exp`` pass in row blocks summed down the columns of each row
    seen as ``[chunk, chunks]`` by pairwise adds of whole rows of that view (one vectorised loop
    with the ``exp``), then over each group's columns, in a fixed order.
    """
    layout = rows.layout
    if not layout.strided:
        return draw_masses(rows)
    groups, per_group = selection.group_shape(layout)

    def block(r):
        x = r.layout.x
        w = jnp.exp(r.scaled(x.reshape(x.shape[0], layout.chunk, layout.chunks)))
        w = selection.down_columns(jnp.where(x.reshape(w.shape) == -jnp.inf, 0.0, w), jnp.add)
        w = selection.pad_columns(w, groups * per_group, 0.0)
        return selection.tree_sum(w.reshape(x.shape[0], groups, per_group))

    return map_rows(block, rows)


def full_mass(rows: Rows) -> jax.Array:
    """``sum(exp(scaled))`` over each row, float32 ``[N]``."""
    return selection.tree_sum(chunk_masses(rows))


def full_thresholds(rows: Rows, rule: str, active: jax.Array) -> jax.Array:
    """Exact per-row thresholds over the whole vocabulary by bisection (no sort)."""
    # Skipped blocks give zeros; their rows are inactive, whose threshold is LOWEST.
    found = map_rows(lambda r, a: _full_thresholds(r, rule, a), rows, active, active=active)
    return jnp.where(active, found, LOWEST)


def _full_thresholds(rows: Rows, rule: str, active: jax.Array) -> jax.Array:
    layout = rows.layout
    x = layout.x
    # Counts are exact in any order; masses are summed in a fixed order (batch-independent).
    # Down strided columns when the row splits into them: the masked weights are then never
    # stored, and each of the bisection's passes reads the logits and weights once.
    if x.shape[1] % _COLUMNS == 0:
        total = lambda keep, w: selection.column_total(
            lambda v: jnp.where(keep(v), w(v), 0.0), x, _COLUMNS
        )
    else:
        total = lambda keep, w: selection.tree_sum(
            selection.chunk_sums(lambda v: jnp.where(keep(v), w(v), 0.0), x, layout.draw_chunk)
        )
    one = lambda y: jnp.ones(y.shape, jnp.float32)
    per_row = lambda v, y: v.reshape(-1, *(1,) * (y.ndim - 1))
    need_k = active & rows.k_on
    k_threshold = smallest_true(
        lambda v: total(lambda y: y > per_row(v, y), one) < rows.top_k, rows.row_max, need_k
    )
    weight = jnp.where(x >= k_threshold[:, None], jnp.exp(rows.scaled(x)), 0.0)
    weight_of = lambda y: weight.reshape(y.shape)
    budget = rows.top_p * total(lambda y: y > -jnp.inf, weight_of)
    if rule == "inclusive":
        predicate = lambda v: total(lambda y: y > per_row(v, y), weight_of) < budget
    else:
        predicate = lambda v: total(lambda y: y >= per_row(v, y), weight_of) <= budget
    p_threshold = smallest_true(predicate, rows.row_max, active & rows.p_on)
    return jnp.maximum(k_threshold, p_threshold)


# The strided columns of the bisection's sums (see _full_thresholds).
_COLUMNS = 16


def tier_slots(count: int, runs: int) -> tuple[int, ...]:
    """The slots of each candidate tier: ``count`` times :data:`TIER_WIDTHS`, the wider tiers
    capped at the ``runs`` (the row's runs of the draw's length, see :func:`resolve`) or at
    :data:`_WIDEST_TIER_MIN`; a tier no wider than the one before it is dropped."""
    cap = max(count, runs, _WIDEST_TIER_MIN)
    slots: list[int] = []
    for width in TIER_WIDTHS:
        size = count if width == 1 else min(width * count, cap)
        if not slots or size > slots[-1]:
            slots.append(size)
    return tuple(slots)


class TierOutcome(NamedTuple):
    """What a candidate tier tells of each row: per-row arrays only (see :func:`resolve`)."""

    threshold: jax.Array  # the row's top-k/top-p threshold (:attr:`Candidates.threshold`)
    certified: jax.Array  # bool: the tier holds the row's whole kept set
    needed: jax.Array  # float32: the slots the row needs (:attr:`TierResult.needed`)
    proved: jax.Array  # bool: :attr:`TierResult.proved`
    finished: object  # what ``finish`` made of the tier's candidates (arrays with N rows)


class Resolution(NamedTuple):
    """Where each row's answer comes from (see :func:`resolve`)."""

    used: tuple[jax.Array, ...]  # [N] bool per tier: the rows it answers (at most one per row)
    # Per tier, ``finish`` applied to its candidates: read it only on the rows the tier answers.
    finished: tuple[object, ...]
    threshold: jax.Array  # [N]: every row's top-k/top-p threshold, LOWEST without filters
    # The sum of the full masses, NaN when any row's logits hold NaN; 0 when no exp pass ran
    # (no row in :attr:`Rows.mass_rows`).
    nan_probe: jax.Array

    @property
    def in_candidates(self) -> jax.Array:
        """Rows answered by some candidate tier (the rest: no filter, or the full bisection)."""
        return functools.reduce(jnp.logical_or, self.used)


def _no_candidates(rows_n: int, slots: int) -> Candidates:
    return Candidates(
        values=jnp.full((rows_n, slots), -jnp.inf),
        indices=jnp.zeros((rows_n, slots), jnp.int32),
        keep=jnp.zeros((rows_n, slots), bool),
        threshold=jnp.full((rows_n,), LOWEST),
        certified=jnp.zeros((rows_n,), bool),
    )


def resolve(rows: Rows, rule: str, count: int, finish=None) -> Resolution:
    """Per-row cutoffs, each row from the first tier that certifies it.

    Rows that are greedy, invalid or unfiltered get threshold ``LOWEST`` and no tier. A row
    tries a tier only when its collection could fit there: rows with top-p and no top-k know
    from :func:`mass_threshold` how many chunks they collect, the others learn it from the
    first tier they try. The first tier runs over the whole batch, the wider ones only over the
    row blocks their rows fill (:func:`selection.map_row_subsets`), so a batch pays for each
    tier about in proportion to the rows that take it.

    ``finish(rows, candidates, ids)`` (optional) runs inside each tier on its candidates and
    returns arrays with one leading row axis (a pytree), e.g. the draw's ``[n]`` tokens and
    logprobs: ``rows`` are the tier's rows, the batch's ``ids`` among them (None for the whole
    batch). The sampler's draw thus hands on per-row results, never the ``[N, slots]``
    candidates, and a tier that does not run has nothing wide to fill.
    """
    rows_n = rows.row_max.shape[0]
    filtered = rows.filtered
    masses = run_if(
        jnp.any(rows.mass_rows), lambda: full_mass(rows), jnp.zeros((rows_n,), jnp.float32)
    )
    mass = jnp.where(rows.mass_rows, masses, 1.0)
    # The tiers' widths are capped in runs of the draw's length (a strided layout's chunks are
    # shorter): the same cap for a vocabulary whichever layout reads it.
    widths = tier_slots(count, rows.layout.x.shape[1] // rows.layout.draw_chunk)
    mass_cut = rows.p_only & filtered
    zeros = jnp.zeros((rows_n,), jnp.float32)
    p_threshold, needed, reached = run_if(
        jnp.any(mass_cut),
        lambda: mass_threshold(rows, mass),
        (zeros, zeros, jnp.ones((rows_n,), bool)),
        costly=True,  # a loop of 12 steps, as tier_threshold's
    )
    needed = jnp.where(mass_cut, needed, 0.0)  # unknown: 0, the first tier finds out
    # A top-p row whose mass bound misses, or whose tokens >= L did not reach top_p in a tier,
    # would miss in every tier (they share its threshold): it goes to the bisection.
    left = filtered & (reached | ~mass_cut)
    start = _first_tiers(needed, left, widths, selection.subset_rows(rows_n))

    def no_finish(slots):
        """Zeros in the shapes of what ``finish`` makes of a tier's candidates."""
        shapes = jax.eval_shape(
            lambda: _finished(finish, rows, _no_candidates(rows_n, slots), None)
        )
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def run_tier(i, slots, left, needed):
        """Tier ``i`` on the rows that try it: (rows answered, finished, threshold, needed, left)."""
        try_here = left & (start <= i) & (needed <= slots)
        if i == 0:
            tier = functools.partial(_tier, rows, slots, rule, mass, p_threshold, finish)
        else:
            tier = functools.partial(
                _tier_by_blocks, rows, slots, rule, mass, p_threshold, finish, try_here
            )
        fallback = TierOutcome(zeros, zeros > 0, zeros, zeros > 0, no_finish(slots))
        # The wider tiers search by loops of 32 steps: behind a branch even off the CPU.
        found = run_if(jnp.any(try_here), tier, fallback, costly=i > 0)
        answered = try_here & found.certified
        needed = jnp.where(try_here, jnp.maximum(needed, found.needed), needed)
        hopeless = try_here & ~found.proved & mass_cut
        return answered, found.finished, found.threshold, needed, left & ~answered & ~hopeless

    first_used, first_finished, first_threshold, needed, left = run_tier(0, widths[0], left, needed)

    def wider():
        """The wider tiers, then the bisection over the vocabulary for the rows left."""
        outcomes, left_now, needed_now = [], left, needed
        for i, slots in enumerate(widths[1:], 1):
            answered, done, cut, needed_now, left_now = run_tier(i, slots, left_now, needed_now)
            outcomes.append((answered, done, cut))
        unanswered = filtered & ~functools.reduce(
            jnp.logical_or, [first_used, *(answered for answered, _, _ in outcomes)]
        )
        full = run_if(
            jnp.any(unanswered),
            lambda: full_thresholds(rows, rule, unanswered),
            jnp.full((rows_n,), LOWEST),
            costly=True,  # up to 64 passes over the logits
        )
        return tuple(outcomes), unanswered, full

    # One branch for everything after the first tier, which usually answers every row: its
    # tiers' and the bisection's own branches are a dozen small operations each. Skipped, no
    # filtered row is left unanswered.
    skipped = (
        tuple((zeros > 0, no_finish(slots), zeros) for slots in widths[1:]),
        zeros > 0,
        jnp.full((rows_n,), LOWEST),
    )
    outcomes, left, full = run_if(jnp.any(filtered & ~first_used), wider, skipped, costly=True)
    used = [first_used, *(answered for answered, _, _ in outcomes)]
    finished = [first_finished, *(done for _, done, _ in outcomes)]
    thresholds = [first_threshold, *(cut for _, _, cut in outcomes)]
    threshold = jnp.where(left, full, LOWEST)
    for tier_cut, use in zip(reversed(thresholds), reversed(used)):
        threshold = jnp.where(use, tier_cut, threshold)
    return Resolution(tuple(used), tuple(finished), threshold, jnp.sum(masses))


def _finished(finish, rows: Rows, cands: Candidates, ids):
    return () if finish is None else finish(rows, cands, ids)


def _first_tiers(needed: jax.Array, active: jax.Array, widths: tuple[int, ...],
                 size: int) -> jax.Array:
    """int32 ``[N]``: the first tier each row tries.

    The narrowest whose slots hold what the row collects (as far as ``needed`` knows), unless
    the next wider tier that runs anyway could take the rows of that one without running more
    row blocks of ``size`` rows: one tier fewer then runs. Small batches, whose rows fill one
    block, thus take a single tier, the widest any of their rows needs.

    The merges work on the count of active rows per tier (one reduction over the batch) and a
    table of where each tier's rows go, so that they are a few scalar operations, not a pass
    over the rows per tier and merge.
    """
    last = len(widths)
    tiers = jnp.arange(last + 1, dtype=jnp.int32)
    first = functools.reduce(jnp.add, [(needed > s).astype(jnp.int32) for s in widths])
    rows_in = jnp.sum(((first[:, None] == tiers) & active[:, None]).astype(jnp.int32), axis=0)
    blocks = lambda rows: (rows + size - 1) // size
    goes_to = tiers
    for j in range(last - 2, -1, -1):
        # The narrowest wider tier that has rows (a candidate tier, not the bisection).
        wider = (tiers > j) & (tiers < last) & (rows_in > 0)
        target = jnp.min(jnp.where(wider, tiers, last))
        here, there = rows_in[j], jnp.sum(jnp.where(tiers == target, rows_in, 0))
        merge = (target < last) & (blocks(here + there) == blocks(there))
        rows_in = jnp.where(merge, jnp.where(tiers == target, here + there,
                                             jnp.where(tiers == j, 0, rows_in)), rows_in)
        goes_to = jnp.where(merge & (goes_to == j), target, goes_to)
    return jnp.sum(jnp.where(first[:, None] == tiers, goes_to, 0), axis=1)


def _tier(rows: Rows, slots: int, rule: str, full_mass: jax.Array, p_threshold: jax.Array,
          finish, ids: jax.Array | None = None) -> TierOutcome:
    """:func:`threshold_candidates` with its :func:`tier_threshold`, and ``finish`` on them."""
    cut = tier_threshold(rows, slots, p_threshold)
    found = threshold_candidates(rows, slots, rule, full_mass, cut)
    cands = found.candidates
    return TierOutcome(cands.threshold, cands.certified, found.needed, found.proved,
                       _finished(finish, rows, cands, ids))


def _tier_by_blocks(rows: Rows, slots: int, rule: str, full_mass: jax.Array,
                    p_threshold: jax.Array, finish, active: jax.Array) -> TierOutcome:
    """:func:`_tier` over the row blocks the ``active`` rows fill.

    Each block reads the logits of its rows through gathers (:meth:`Layout.take_rows`); the
    rows of blocks that do not run get an empty, uncertified result.
    """
    def block(ids):
        return _tier(take_rows(rows, ids), slots, rule, full_mass[ids], p_threshold[ids], finish, ids)

    size = selection.subset_rows(active.shape[0])
    return selection.map_row_subsets(block, active, size)


def take_rows(rows: Rows, ids: jax.Array) -> Rows:
    """The rows ``ids`` ([n] int32) of ``rows``; the logits stay whole (see :meth:`Layout.take_rows`)."""
    return Rows(rows.layout.take_rows(ids), *(field[ids] for field in rows[1:]))
