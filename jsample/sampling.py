"""The public samplers: ``sample``, ``sample_from_uniform``, ``probs`` and ``log_probs``.

Each public function checks its inputs in Python (eagerly, with errors that name the argument),
flattens the batch to ``[rows, vocab]`` and calls one private jitted function whose only static
arguments are the top-p rule, the candidate count and the control style (:mod:`jsample.control`,
set by the backend). Parameter values are traced, so new values reuse the compiled program.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jax import lax

from jsample import control, cutoff, draw, selection, uniforms, validation
from jsample.params import FIELD_DTYPES, SamplingParams
from jsample.selection import is_clean, make_layout, sanitize_logits


def _prepare(fn: str, logits: Any, params: SamplingParams):
    """Checks inputs; returns ``(x [N, V], [t, k, p, min_p] each [N], batch_shape)``."""
    logits = validation.check_logits(logits, fn)
    validation.check_not_explicitly_sharded(logits, fn)
    validation.check_params(params)
    batch_shape = tuple(logits.shape[:-1])
    values = [
        validation.broadcast_param(name, getattr(params, name), batch_shape, dtype).reshape(-1)
        for name, dtype in FIELD_DTYPES.items()
    ]
    return logits.reshape(-1, logits.shape[-1]), values, batch_shape


def _on_clean_logits(logits, fn):
    """Runs ``fn(layout)`` on float32 logits, sanitising them only when some row needs it.

    NaN and ``+inf`` show up in the chunk maxima, so the common clean case reads the logits as
    they are: a sanitising select in every pass would cost several times a plain pass on CPU.
    """
    x = logits.astype(jnp.float32)
    layout = make_layout(x)
    return lax.cond(
        is_clean(layout),
        lambda: fn(layout),
        lambda: fn(make_layout(sanitize_logits(x))),
    )


def _rows(layout, temperature, top_k, top_p, min_p) -> cutoff.Rows:
    return cutoff.prepare_rows(layout, temperature, top_k, top_p, min_p)


def _sample_layout(layout, u, params, rule, count):
    """Tokens and logprobs of every row, and what they say of the logits:
    ``(token, logprob, below_infinity, probed, probe)``.

    ``below_infinity``: no row maximum is ``+inf``. When ``probed`` (decided by the parameters
    alone, see :attr:`cutoff.Rows.mass_rows` and :attr:`cutoff.Rows.unfiltered`), an exp pass
    read every row of the logits and ``probe`` is NaN exactly when one holds NaN: the caller
    needs no pass of its own to find out.
    """
    rows = _rows(layout, *params)
    n = u.shape[0]
    zeros = (jnp.zeros((n,), jnp.int32), jnp.zeros((n,), jnp.float32))
    plain = rows.greedy | ~rows.valid

    def sampled():
        # Each candidate tier draws for its rows as it runs (over the row blocks it runs on):
        # it hands on tokens and logprobs, never its candidates.
        res = cutoff.resolve(
            rows, rule, count,
            finish=lambda r, cands, ids: draw.draw_sorted(r, cands, u if ids is None else u[ids]),
        )
        # Rows outside the candidate tiers have no filter (threshold LOWEST) or a threshold from
        # the bisection over the vocabulary: they draw from chunk masses.
        chunked = (~res.in_candidates & ~plain) | rows.unfiltered
        # The draw's exp pass reads only the row blocks its rows fill, except on chunks of
        # consecutive tokens, where it may be the NaN probe (see probed below) and must read
        # every row; the strided maxima are the probe of a strided layout.
        drawn_rows = chunked if layout.strided else None
        token, logprob, mass = control.run_if(
            jnp.any(chunked),
            lambda: draw.draw_chunked(rows, res.threshold, u, drawn_rows),
            (*zeros, jnp.zeros((n,), jnp.float32)),
        )
        for use, (drawn_token, drawn_logprob) in zip(res.used, res.finished):
            token = jnp.where(use, drawn_token, token)
            logprob = jnp.where(use, drawn_logprob, logprob)
        return token, logprob, res.nan_probe + jnp.sum(mass)

    probed = jnp.any(rows.mass_rows | rows.unfiltered)
    # Costly: all but the argmax, which a batch of greedy rows skips.
    token, logprob, probe = control.run_if(
        jnp.any(~plain) | probed, sampled, (*zeros, jnp.float32(0.0)), costly=True
    )
    greedy = control.run_if(jnp.any(plain), rows.greedy_tokens, zeros[0])
    token = jnp.where(plain, greedy, token)
    # Greedy rows drew their token with probability 1; rows without a finite logit are flagged.
    logprob = jnp.where(rows.greedy, 0.0, logprob)
    logprob = jnp.where(rows.valid, logprob, -jnp.inf)
    # From the row maxima (a [rows] array): the same test on the chunk maxima is one more
    # reduction of [rows, chunks], which XLA:CPU hands to YNNPACK at a dispatch cost.
    below_infinity = jnp.all(rows.row_max < jnp.inf)
    return token, logprob, below_infinity, probed, probe


@control.styled_jit(static_argnames=("rule", "count"))
def _sample_rows(u, x, temperature, top_k, top_p, min_p, *, rule, count):
    validation.report_logits(x)
    params = validation.sanitize_params(temperature, top_k, top_p, min_p)
    chunk = selection.fine_chunk(x.shape[1])

    def sanitized(xb, ub, *pb):
        layout = make_layout(sanitize_logits(xb.astype(jnp.float32)), chunk)
        return _sample_layout(layout, ub, pb, rule, count)[:2]

    if chunk is None:
        # A chunk length that does not divide the vocabulary means a padded copy: make it
        # block by block.
        return selection.map_row_blocks(sanitized, x, u, *params)
    # The whole batch at once, in its own dtype: every pass over the logits is a reduction
    # that reads them in place or runs in row blocks, and the rest works on small arrays.
    # The sampler runs on the logits as they are and only the final select waits for the NaN
    # check. On NaN or +inf that first answer is garbage (but finite work) and the sanitising
    # branch replaces it.
    strided = x.dtype == jnp.float32
    layout = selection.make_strided_layout(x) if strided else make_layout(x, chunk)
    token, logprob, below_infinity, probed, probe = _sample_layout(layout, u, params, rule, count)
    if strided:
        # The strided chunk maxima propagate NaN: the one pass that made them tells.
        nan_probe = selection.nan_probe(layout)
    else:
        # When the parameters make the sampler read every row through an exp pass, its sums
        # reveal NaN; otherwise a plain sum reads the logits a second time to find out.
        nan_probe = jnp.where(probed, probe, control.run_if(
            ~probed, lambda: selection.nan_sum(layout).astype(jnp.float32), jnp.float32(0.0)
        ))
    clean = below_infinity & ~jnp.isnan(nan_probe)
    n = u.shape[0]
    fixed = lax.cond(  # a whole second sample: a runtime branch in either style
        clean,
        lambda: (jnp.zeros((n,), jnp.int32), jnp.zeros((n,), jnp.float32)),
        lambda: selection.map_row_blocks(sanitized, x, u, *params),
    )
    return jnp.where(clean, token, fixed[0]), jnp.where(clean, logprob, fixed[1])


def kept_mask(rows: cutoff.Rows, rule: str, count: int) -> jax.Array:
    """bool ``[N, V]``: the tokens each row keeps (one-hot for greedy rows, none for invalid)."""
    threshold = cutoff.resolve(rows, rule, count).threshold
    values = rows.layout.x[:, : rows.layout.vocab]
    vocab_ids = jnp.arange(rows.layout.vocab, dtype=jnp.int32)
    greedy = vocab_ids == rows.greedy_tokens()[:, None]
    keep = jnp.where(rows.greedy[:, None], greedy, rows.keep(values, threshold))
    return keep & rows.valid[:, None]


def _log_probs_layout(layout, params, rule, count):
    rows = _rows(layout, *params)
    keep = kept_mask(rows, rule, count)
    # Greedy rows have temperature 1 here, so their single kept token gets log-probability 0.
    scaled = rows.scaled(layout.x[:, : layout.vocab])
    log_mass = jnp.log(jnp.sum(jnp.where(keep, jnp.exp(scaled), 0.0), axis=1, keepdims=True))
    return jnp.where(keep, scaled - log_mass, -jnp.inf)


@control.styled_jit(static_argnames=("rule", "count"))
def _log_probs_rows(x, temperature, top_k, top_p, min_p, *, rule, count):
    validation.report_logits(x)
    params = validation.sanitize_params(temperature, top_k, top_p, min_p)

    def block(xb, *pb):
        return _on_clean_logits(xb, lambda layout: _log_probs_layout(layout, pb, rule, count))

    return selection.map_row_blocks(block, x, *params)


def _uniforms(fn: str, key: Any, batch_shape: tuple[int, ...]) -> jax.Array:
    """One uniform per row, bit for bit ``jax.random.uniform`` (see :mod:`jsample.uniforms`)."""
    key, batched = validation.check_key(key, batch_shape, fn)
    if batched:
        return uniforms.uniform_per_key(key.reshape(-1))
    return uniforms.uniform(key, math.prod(batch_shape))


def _finish(token, logprob, batch_shape, return_logprobs):
    token = token.reshape(batch_shape)
    if return_logprobs:
        return token, logprob.reshape(batch_shape)
    return token


def sample(key: jax.Array, logits: jax.Array, params: SamplingParams | None = None, *,
           return_logprobs: bool = False):
    """Samples one token per row of ``logits``.

    Applies temperature -> top-k -> top-p -> min-p (see :class:`SamplingParams`), then draws from
    the remaining distribution, which is exactly :func:`probs`. Runs under ``jit``, ``vmap``,
    ``scan`` and ``while_loop``; parameter values are traced and never recompile.

    Args:
      key: one PRNG key (``jax.random.key`` or legacy ``jax.random.PRNGKey``), or one key per row
        with shape ``logits.shape[:-1]``. With one key per row, row ``b``'s token depends only on
        ``key[b]`` and ``logits[b]``. With one key, the rows draw independent uniforms from it.
      logits: float ``[..., vocab]`` (float32, bfloat16 or float16; math is in float32). NaN
        logits count as ``-inf``.
      params: a :class:`SamplingParams`; ``None`` samples from ``softmax(logits)``.
      return_logprobs: also return the log-probability of each token under :func:`probs`.

    Returns:
      int32 ``[...]`` tokens, or ``(tokens, logprobs)`` with float32 ``[...]`` logprobs. A row
      with no finite logit returns token 0 with logprob ``-inf``.

    Example:
      >>> import jax, jax.numpy as jnp, jsample as js
      >>> logits = jnp.array([[2.0, 1.0, 0.1], [0.0, 3.0, 0.0]])
      >>> js.sample(jax.random.key(0), logits, js.SamplingParams(temperature=0.0)).tolist()
      [0, 1]
    """
    params = SamplingParams() if params is None else params
    x, values, batch_shape = _prepare("jsample.sample", logits, params)
    u = _uniforms("jsample.sample", key, batch_shape)
    token, logprob = _sample_rows(u, x, *values, rule=params.top_p_rule, count=params.candidates)
    return _finish(token, logprob, batch_shape, return_logprobs)


def sample_from_uniform(u: jax.Array, logits: jax.Array, params: SamplingParams | None = None, *,
                        return_logprobs: bool = False):
    """Inverse-CDF sampling: the first token whose cumulative probability exceeds ``u``.

    The cumulative sum runs over :func:`probs` in vocabulary order, exactly as a PyTorch
    ``torch.searchsorted(probs.cumsum(-1), u, right=True)`` over the same distribution would, so
    a PyTorch run can be replayed token for token (up to float rounding at a boundary).
    :func:`sample` is this function applied to ``jax.random.uniform`` draws.

    Args:
      u: float ``[...]`` in ``[0, 1)``, one per row (the batch shape of ``logits``). Concrete
        values outside raise ``ValueError``; traced ones count as 0 (NaN, ``< 0``) or as just
        below 1 (``>= 1``), so the token always has positive probability.
      logits: float ``[..., vocab]``.
      params: a :class:`SamplingParams`; ``None`` means plain softmax.
      return_logprobs: also return each token's log-probability.

    Example:
      >>> import jax.numpy as jnp, jsample as js
      >>> logits = jnp.log(jnp.array([0.5, 0.25, 0.25]))
      >>> [int(js.sample_from_uniform(jnp.float32(u), logits)) for u in (0.1, 0.6, 0.9)]
      [0, 1, 2]
    """
    params = SamplingParams() if params is None else params
    x, values, batch_shape = _prepare("jsample.sample_from_uniform", logits, params)
    u = validation.check_uniform(u, batch_shape, "jsample.sample_from_uniform")
    token, logprob = _sample_rows(u.reshape(-1), x, *values, rule=params.top_p_rule,
                                  count=params.candidates)
    return _finish(token, logprob, batch_shape, return_logprobs)


def log_probs(logits: jax.Array, params: SamplingParams | None = None) -> jax.Array:
    """float32 ``[..., vocab]``: log of :func:`probs`, ``-inf`` on removed tokens.

    Example:
      >>> import jax.numpy as jnp, jsample as js
      >>> lp = js.log_probs(jnp.array([1.0, 2.0, 3.0]), js.SamplingParams(top_k=2))
      >>> bool(jnp.isneginf(lp[0]))
      True
    """
    return _log_probs(logits, params, "jsample.log_probs")


def probs(logits: jax.Array, params: SamplingParams | None = None) -> jax.Array:
    """float32 ``[..., vocab]``: the exact distribution :func:`sample` draws from.

    Rows sum to 1 (a row with no finite logit is all zeros); removed tokens are exactly 0;
    greedy rows (``temperature=0``) are one-hot at the first maximum.

    Example:
      >>> import jax.numpy as jnp, jsample as js
      >>> p = js.probs(jnp.log(jnp.array([0.5, 0.25, 0.125, 0.125])), js.SamplingParams(top_p=0.6))
      >>> [round(float(v), 3) for v in p]
      [0.667, 0.333, 0.0, 0.0]
    """
    return jnp.exp(_log_probs(logits, params, "jsample.probs"))


def _log_probs(logits, params, fn):
    params = SamplingParams() if params is None else params
    x, values, batch_shape = _prepare(fn, logits, params)
    logp = _log_probs_rows(x, *values, rule=params.top_p_rule, count=params.candidates)
    return logp.reshape(*batch_shape, x.shape[-1])
