"""Which tokens each row keeps: the exact rules of temperature, top-k, top-p and min-p.

Every filter keeps a set that is closed upwards in logit value, so a row's kept set is always
``{token : logit >= threshold and prob >= min_p * max_prob}``. The rules, by value (ties are kept
or dropped together, so the result never depends on token order):

* top-k keeps a token when fewer than ``k`` tokens have a strictly larger logit;
* top-p ``"inclusive"`` keeps a token when the mass of strictly larger tokens is ``< top_p``;
  ``"exclusive"`` keeps it when the mass of tokens at least as large is ``<= top_p``; both keep
  the top token(s); masses are taken on the tempered, top-k-renormalised distribution;
* min-p keeps a token when ``exp((logit - max) / T) >= min_p``.

The threshold comes from the row's top candidates when the kept set provably fits in them
(:func:`candidate_cutoff`) and otherwise from an exact bisection over the whole vocabulary
(:func:`full_thresholds`). Both evaluate the same rules.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jsample.selection import LOWEST, Layout, first_argmax, smallest_true, top_candidates


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
        the reduction that consumes it. ``-inf`` logits get weight 0 without a test.
        """
        extra = (1,) * (values.ndim - 1)
        weight = jnp.exp(self.scaled(values))
        kept = (values >= threshold.reshape(-1, *extra)) & (weight >= self.min_p.reshape(-1, *extra))
        return jnp.where(kept, weight, 0.0)

    def greedy_tokens(self) -> jax.Array:
        return first_argmax(self.layout, jnp.where(self.valid, self.row_max, -jnp.inf))


def prepare_rows(layout: Layout, temperature, top_k, top_p, min_p) -> Rows:
    """``layout``: sanitised float32 logits; parameters: sanitised ``[N]``."""
    row_max = layout.chunk_max.max(axis=-1)
    valid = row_max > -jnp.inf
    greedy = temperature == 0
    vocab = layout.vocab
    return Rows(
        layout=layout,
        row_max=jnp.where(valid, row_max, 0.0),
        temperature=jnp.where(greedy, 1.0, temperature),
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        greedy=greedy,
        valid=valid,
        k_on=(top_k > 0) & (top_k < vocab),
        p_on=top_p < 1,
    )


class Candidates(NamedTuple):
    values: jax.Array  # [N, K] logits, descending
    indices: jax.Array  # [N, K] int32 token ids
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
    threshold = jnp.min(jnp.where(keep_kp, values, jnp.inf), axis=1)
    keep = keep_kp & (weight >= rows.min_p[:, None])
    exact_mass = ~(rows.k_on & rows.p_on) | ~keep_k[:, -1]
    certified = (count == rows.layout.vocab) | (~keep[:, -1] & exact_mass)
    return Candidates(values, indices, keep, threshold, certified)


def full_mass(rows: Rows) -> jax.Array:
    return jnp.sum(jnp.exp(rows.scaled(rows.layout.x)), axis=1)


def full_thresholds(rows: Rows, rule: str, active: jax.Array) -> jax.Array:
    """Exact per-row thresholds over the whole vocabulary by bisection (no sort)."""
    x = rows.layout.x
    need_k = active & rows.k_on
    k_threshold = smallest_true(
        lambda v: jnp.sum(x > v[:, None], axis=1) < rows.top_k, rows.row_max, need_k
    )
    weight = jnp.where(x >= k_threshold[:, None], jnp.exp(rows.scaled(x)), 0.0)
    budget = rows.top_p * jnp.sum(weight, axis=1)
    if rule == "inclusive":
        predicate = lambda v: jnp.sum(jnp.where(x > v[:, None], weight, 0.0), axis=1) < budget
    else:
        predicate = lambda v: jnp.sum(jnp.where(x >= v[:, None], weight, 0.0), axis=1) <= budget
    p_threshold = smallest_true(predicate, rows.row_max, active & rows.p_on)
    return jnp.maximum(k_threshold, p_threshold)


def run_if(any_row: jax.Array, fn, fallback):
    """Runs ``fn()`` only when some row needs it: a runtime branch, compiled once."""
    return lax.cond(any_row, lambda _: fn(), lambda _: fallback, None)


def resolve(rows: Rows, rule: str, count: int) -> tuple[Candidates, jax.Array, jax.Array]:
    """Per-row cutoffs.

    Returns ``(candidates, use_candidates, threshold)``: ``use_candidates[n]`` says row ``n`` is
    filtered and certified, so its kept set is ``candidates.keep[n]``; ``threshold`` is every
    row's threshold (``LOWEST`` for rows without filters).
    """
    rows_n = rows.row_max.shape[0]
    count = min(count, rows.layout.vocab)
    filtered = rows.filtered

    def tier_one():
        needs_mass = filtered & ~rows.k_on & rows.p_on
        mass = run_if(jnp.any(needs_mass), lambda: full_mass(rows), jnp.ones((rows_n,)))
        return candidate_cutoff(rows, count, rule, mass)

    empty = Candidates(
        values=jnp.full((rows_n, count), -jnp.inf),
        indices=jnp.zeros((rows_n, count), jnp.int32),
        keep=jnp.zeros((rows_n, count), bool),
        threshold=jnp.full((rows_n,), LOWEST),
        certified=jnp.zeros((rows_n,), bool),
    )
    cands = run_if(jnp.any(filtered), tier_one, empty)
    use_candidates = filtered & cands.certified
    needs_full = filtered & ~cands.certified
    full = run_if(
        jnp.any(needs_full),
        lambda: full_thresholds(rows, rule, needs_full),
        jnp.full((rows_n,), LOWEST),
    )
    threshold = jnp.where(use_candidates, cands.threshold, jnp.where(needs_full, full, LOWEST))
    return cands, use_candidates, threshold
