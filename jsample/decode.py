"""A compiled decode loop: sampling, stop tokens, padding and per-row keys in one ``while_loop``.

The loop calls a user ``step_fn(state, tokens) -> (logits, state)`` (a Flax model with a KV
cache, typically) and does the bookkeeping: per-row stopping at ``eos_id``, padding, lengths,
log-probabilities, and a key schedule under which each row's tokens depend only on its own key.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh

from jsample import control, validation
from jsample.params import FIELD_DTYPES, SamplingParams
from jsample.sampling import sample
from jsample.sharding import AxisName, sample_sharded

StepFn = Callable[[Any, jax.Array], tuple[jax.Array, Any]]


class DecodeResult(NamedTuple):
    """What :func:`decode` returns (a pytree, so it can leave a ``jit``).

    Attributes:
      tokens: int32 ``[B, max_new_tokens]``: row ``b``'s tokens in ``tokens[b, :lengths[b]]``
        (ending with ``eos_id`` when the row stopped), ``pad_id`` after that.
      lengths: int32 ``[B]``: tokens generated per row, the stop token included.
      logprobs: float32 ``[B, max_new_tokens]``: log-probability of each token under the
        distribution it was drawn from (:func:`jsample.probs` of that step's logits, so ``0``
        for greedy rows); ``0`` at padded positions.
      state: ``step_fn``'s state after the last forward pass. The final token of the last step
        is never fed (its logits would go unused), so to continue decoding, feed
        ``tokens[:, steps - 1]``, where ``steps = max(lengths)``.
    """

    tokens: jax.Array
    lengths: jax.Array
    logprobs: jax.Array
    state: Any


def decode(
    step_fn: StepFn,
    state: Any,
    logits: jax.Array,
    key: jax.Array,
    params: SamplingParams | None = None,
    *,
    max_new_tokens: int,
    eos_id: int | jax.Array | None = None,
    pad_id: int | jax.Array = 0,
    mesh: Mesh | None = None,
    vocab_axis: AxisName = "model",
    batch_axis: AxisName = "data",
) -> DecodeResult:
    """Samples up to ``max_new_tokens`` tokens per row in one compiled ``lax.while_loop``.

    Each step draws one token per row from the current logits with :func:`jsample.sample`
    (temperature -> top-k -> top-p -> min-p, per-row parameters), records it, and, when another
    token is needed, feeds it to ``step_fn`` for the next logits. A row stops after emitting
    ``eos_id`` (kept, and counted in ``lengths``); finished rows receive ``pad_id`` as their
    token from then on. The loop exits as soon as every row has stopped.

    Key schedule: row ``b``'s key is ``key[b]`` when one key per row is given, and
    ``jax.random.fold_in(key, b)`` when one key is given (so one key equals the per-row keys
    ``[fold_in(key, b) for b in range(B)]``, and a row's draws never depend on the batch size).
    Its ``t``-th token (``t = 0, 1, ...``) uses the uniform ``jax.random.uniform(fold_in(row_key,
    t))`` as in :func:`jsample.sample_from_uniform`. With per-row keys a row's tokens therefore
    depend only on its key and its logits: reordering the batch reorders the output.

    The loop is compiled once per ``step_fn``, ``max_new_tokens``, the static settings of
    ``params`` (``top_p_rule``, ``candidates``) and the shapes and dtypes of the inputs. New
    sampling parameter values (scalar or per row), one key or per-row keys, prompts, model
    weights (when they travel in ``state``), ``eos_id`` and ``pad_id`` all reuse it.
    ``step_fn`` is a static argument compared by ``==``/``hash``: define it once (a
    module-level function, or an object with value equality) rather than a new lambda per
    call. ``decode`` also runs inside a caller's ``jit``.

    Args:
      step_fn: ``step_fn(state, tokens int32 [B]) -> (logits [B, vocab], state)``; the returned
        state must have the input's structure, shapes and dtypes. Model weights belong in
        ``state`` too: values captured by a closure are compiled in as constants.
      state: any pytree of arrays, e.g. ``(weights, kv_cache)``.
      logits: float ``[B, vocab]``: the logits of each row's first new token (from the caller's
        prefill). Logits from ``step_fn`` are cast to this dtype.
      key: one PRNG key, or one key per row (shape ``[B]``); see the key schedule above.
      params: :class:`jsample.SamplingParams`, each field a scalar or one value per row;
        ``None`` samples from ``softmax(logits)``.
      max_new_tokens: Python int ``>= 0``, the most tokens generated per row.
      eos_id: stop token, an int in ``[0, vocab)``, or ``None`` to always generate
        ``max_new_tokens`` tokens.
      pad_id: int written after a row stops, and fed to ``step_fn`` for stopped rows.
      mesh: when the logits are sharded over a :class:`jax.sharding.Mesh` (a tensor-parallel LM
        head), each step samples with :func:`jsample.sample_sharded` instead: the same tokens,
        without gathering the vocabulary. Its axes must be of type ``AxisType.Auto``.
      vocab_axis: the mesh axis (or axes) splitting the vocabulary, as in
        :func:`jsample.sample_sharded`.
      batch_axis: the mesh axis (or axes) splitting the rows.

    Returns:
      A :class:`DecodeResult` ``(tokens, lengths, logprobs, state)``.

    Example:
      A bigram "model" whose state is a step counter; token 3 is the stop token:

      >>> import jax, jax.numpy as jnp, jsample as js
      >>> table = jnp.log(jnp.array([[.1, .6, .2, .1], [.1, .1, .7, .1],
      ...                            [.1, .1, .1, .7], [.7, .1, .1, .1]]))
      >>> def step(count, tokens):
      ...     return table[tokens], count + 1
      >>> out = js.decode(step, jnp.int32(0), table[jnp.array([0, 1])], jax.random.key(0),
      ...                 js.SamplingParams(temperature=0.0), max_new_tokens=5, eos_id=3)
      >>> out.tokens.tolist(), out.lengths.tolist(), int(out.state)
      ([[1, 2, 3, 0, 0], [2, 3, 0, 0, 0]], [3, 2], 2)
    """
    fn = "jsample.decode"
    if not callable(step_fn):
        raise TypeError(f"{fn}: step_fn must be callable, got {type(step_fn).__name__}.")
    try:
        hash(step_fn)
    except TypeError:
        raise TypeError(
            f"{fn}: step_fn must be hashable (it is a static argument of the compiled loop); "
            f"got an unhashable {type(step_fn).__name__}."
        ) from None
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 0:
        raise ValueError(f"{fn}: max_new_tokens must be a Python int >= 0, got {max_new_tokens!r}.")
    logits = validation.check_logits(logits, fn)
    if logits.ndim != 2:
        raise ValueError(f"{fn}: logits must have shape [batch, vocab], got {tuple(logits.shape)}.")
    batch, vocab = logits.shape
    params = SamplingParams() if params is None else params
    validation.check_params(params)
    values = tuple(
        validation.broadcast_param(name, getattr(params, name), (batch,), dtype)
        for name, dtype in FIELD_DTYPES.items()
    )
    key, batched = validation.check_key(key, (batch,), fn)
    row_keys = key if batched else jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(batch))
    # No stop token is a stop token no row can emit, so both cases share one compiled loop.
    eos_id = jnp.int32(-1) if eos_id is None else _token_id(fn, "eos_id", eos_id, vocab)
    pad_id = _token_id(fn, "pad_id", pad_id, None)
    if max_new_tokens == 0:
        empty = jnp.zeros((batch, 0))
        return DecodeResult(empty.astype(jnp.int32), jnp.zeros((batch,), jnp.int32), empty, state)
    return _decode(
        step_fn, state, logits, row_keys, values, eos_id, pad_id,
        max_new_tokens=int(max_new_tokens), rule=params.top_p_rule, count=params.candidates,
        sharding=None if mesh is None else (mesh, vocab_axis, batch_axis),
    )


def _token_id(fn: str, name: str, value: Any, vocab: int | None) -> jax.Array:
    """An int32 scalar; checked against ``[0, vocab)`` when concrete and ``vocab`` is given."""
    if validation.is_traced(value):
        if value.shape != () or not jnp.issubdtype(value.dtype, jnp.integer):
            raise TypeError(
                f"{fn}: {name} must be an integer scalar, got {value.dtype}{list(value.shape)}."
            )
        return value.astype(jnp.int32)
    host = np.asarray(value)
    if isinstance(value, bool) or host.shape != () or host.dtype.kind not in "iu":
        raise TypeError(f"{fn}: {name} must be an integer scalar, got {value!r}.")
    if vocab is not None and not 0 <= int(host) < vocab:
        raise ValueError(f"{fn}: {name} must be a token id in [0, {vocab}), got {int(host)}.")
    return jnp.int32(host)


def _sample_step(keys: jax.Array, logits: jax.Array, params: SamplingParams, sharding):
    """The loop's only call into the sampler: ``(tokens int32 [B], logprobs float32 [B])``."""
    if sharding is None:
        return sample(keys, logits, params, return_logprobs=True)
    mesh, vocab_axis, batch_axis = sharding
    return sample_sharded(keys, logits, params, mesh=mesh, vocab_axis=vocab_axis,
                          batch_axis=batch_axis, return_logprobs=True)


def _check_step_output(step_fn, logits, state, new_logits, new_state) -> None:
    got = getattr(new_logits, "shape", type(new_logits).__name__)
    if got != logits.shape:
        raise ValueError(
            f"jsample.decode: step_fn must return logits of shape {tuple(logits.shape)} (the "
            f"initial logits' shape), got {got}."
        )
    shapes = lambda tree: jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a)), tree)
    if jax.tree.structure(state) != jax.tree.structure(new_state) or \
            shapes(state) != shapes(new_state):
        raise TypeError(
            f"jsample.decode: step_fn {getattr(step_fn, '__name__', step_fn)!r} must return a "
            "state with the same structure, shapes and dtypes as the state it was given."
        )


@control.styled_jit(
    static_argnums=0,
    static_argnames=("max_new_tokens", "rule", "count", "sharding"),
)
def _decode(step_fn, state, logits, row_keys, values, eos_id, pad_id, *,
            max_new_tokens, rule, count, sharding) -> DecodeResult:
    batch = logits.shape[0]
    params = SamplingParams(*values, top_p_rule=rule, candidates=count)

    class Carry(NamedTuple):
        step: jax.Array  # int32 []
        tokens: jax.Array  # int32 [B, max_new_tokens]
        logprobs: jax.Array  # float32 [B, max_new_tokens]
        lengths: jax.Array  # int32 [B]
        done: jax.Array  # bool [B]
        logits: jax.Array  # [B, V]
        state: Any

    def unfinished(c: Carry) -> jax.Array:
        return (c.step < max_new_tokens) & ~jnp.all(c.done)

    def body(c: Carry) -> Carry:
        keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, c.step)
        token, logprob = _sample_step(keys, c.logits, params, sharding)
        token = jnp.where(c.done, pad_id, token)
        logprob = jnp.where(c.done, 0.0, logprob)
        lengths = c.lengths + (~c.done).astype(jnp.int32)
        done = c.done | (token == eos_id)
        column = (0, c.step)
        tokens = lax.dynamic_update_slice(c.tokens, token[:, None], column)
        logprobs = lax.dynamic_update_slice(c.logprobs, logprob[:, None], column)

        def forward():
            new_logits, new_state = step_fn(c.state, token)
            _check_step_output(step_fn, c.logits, c.state, new_logits, new_state)
            return new_logits.astype(c.logits.dtype), new_state

        # The forward pass after the last token would produce logits nobody samples from.
        more = (c.step + 1 < max_new_tokens) & ~jnp.all(done)
        next_logits, state = lax.cond(more, forward, lambda: (c.logits, c.state))
        return Carry(c.step + 1, tokens, logprobs, lengths, done, next_logits, state)

    start = Carry(
        step=jnp.int32(0),
        tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
        logprobs=jnp.zeros((batch, max_new_tokens), jnp.float32),
        lengths=jnp.zeros((batch,), jnp.int32),
        done=jnp.zeros((batch,), bool),
        logits=logits,
        state=state,
    )
    end = lax.while_loop(unfinished, body, start)
    return DecodeResult(end.tokens, end.lengths, end.logprobs, end.state)
