"""Checked mode: report the bad traced values that jsample would otherwise clamp silently.

Outside ``jit``, bad input raises at once (``ValueError``/``TypeError`` naming the argument).
Under ``jit`` the values are not known in Python, so jsample applies a documented rule instead
(README, "Guarantees"): out-of-range parameters are clamped, NaN logits count as ``-inf``,
``+inf`` logits as the largest float32, a row without a finite logit gets token 0 with logprob
``-inf``, and ``sample_from_uniform`` treats ``u`` outside ``[0, 1)`` as its nearest end. The
result is always a valid token, never NaN; :func:`checked` makes those substitutions visible.

Every such rule carries a :func:`jax.experimental.checkify.debug_check`, traced only while
:func:`checked` traces its function (a JAX configuration state, part of JAX's cache keys, says
so): a check is a JAX effect, and any jitted function holding one is dispatched by JAX's slower
Python path. A normal program holds no check and pays nothing; the checked one returns the first
failed check as an error value.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import jax
from jax.experimental import checkify

from jsample import validation

Out = TypeVar("Out")


def checked(
    fn: Callable[..., Out], *, errors: frozenset = checkify.user_checks
) -> Callable[..., tuple[checkify.Error, Out]]:
    """Wraps ``fn`` so that it returns ``(err, out)``, ``err`` naming the first bad value.

    ``fn`` is any function that calls jsample (:func:`jsample.sample`, :func:`jsample.probs`,
    :func:`jsample.decode`, a user's model step...), jitted or not. ``err.get()`` is ``None``
    when every value was in range, and otherwise a message naming the argument, the allowed
    range, the offending value and its row, and what jsample did with it. ``err.throw()``
    raises it as a ``JaxRuntimeError``. The checks cover:

    * ``SamplingParams`` values outside their range (temperature NaN, negative or infinite;
      ``top_k < 0``; ``top_p`` or ``min_p`` NaN or outside ``[0, 1]``);
    * logits holding NaN or ``+inf``, and rows without a finite logit;
    * uniforms given to :func:`jsample.sample_from_uniform` outside ``[0, 1)``.

    The checked program is compiled separately from ``fn`` and costs a few extra reductions
    over the logits; ``fn`` itself is unchanged and pays nothing for the checks.

    Args:
      fn: the function to check. Its outputs are returned unchanged as ``out``.
      errors: the ``checkify`` error categories to enable. The default,
        ``checkify.user_checks``, runs jsample's checks (and any ``checkify.check`` of yours);
        ``checkify.nan_checks`` would also flag the NaN that jsample deliberately receives and
        removes, so it is not a useful addition here.

    Returns:
      A function with ``fn``'s signature returning ``(err, out)``. It can itself be jitted. When
      it runs eagerly, ``err`` is fetched to the host, so ``err.get()`` also works for outputs
      sharded over several devices (the message is then prefixed by the device index, and row
      indices count within that device's block of rows).

    Example:
      >>> import jax, jax.numpy as jnp, jsample as js
      >>> def step(key, logits, temperature):
      ...     return js.sample(key, logits, js.SamplingParams(temperature=temperature))
      >>> logits = jnp.zeros((2, 5))
      >>> err, tokens = js.checked(jax.jit(step))(jax.random.key(0), logits, jnp.array([1.0, -1.0]))
      >>> print(err.get())  # doctest: +ELLIPSIS
      SamplingParams.temperature must be a finite number >= 0 (0 means greedy), got -1.0 at row 1...
      >>> err, tokens = js.checked(step)(jax.random.key(0), logits, jnp.array([1.0, 0.5]))
      >>> err.get() is None
      True
    """
    transformed = checkify.checkify(fn, errors=errors)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> tuple[checkify.Error, Out]:
        if validation.CHECKED_MODE is None:
            err, out = transformed(*args, **kwargs)
        else:
            with validation.CHECKED_MODE(True):
                err, out = transformed(*args, **kwargs)
        leaves = jax.tree.leaves(err)
        if leaves and not any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
            # Errors of sharded outputs stay sharded; Error.get() can only index host arrays.
            err = jax.device_get(err)
        return err, out

    return wrapper
