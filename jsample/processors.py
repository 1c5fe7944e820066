"""Logit processors: pure ``logits -> logits`` functions that compose into any order.

Each one applies a single rule of :class:`jsample.SamplingParams` and sets removed entries to
``-inf``, using the same exact code as :func:`jsample.sample`. Outputs are float32. Chaining
them and sampling with the default ``SamplingParams()`` (plain softmax) reproduces orders the
default pipeline does not use, e.g. labml's top-p before temperature::

    logits = js.mask_top_p(logits, 0.9)
    logits = js.apply_temperature(logits, 0.7)
    token = js.sample(key, logits)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsample import control, sampling, selection, validation
from jsample.params import FIELD_DTYPES, SamplingParams


def _apply_layout(layout, params, rule, divide):
    rows = sampling._rows(layout, *params)
    keep = sampling.kept_mask(rows, rule, SamplingParams().candidates)
    values = layout.x[:, : layout.vocab]
    if divide:
        values = values / rows.temperature[:, None]
    return jnp.where(keep, values, -jnp.inf)


@control.styled_jit(static_argnames=("rule", "divide"))
def _apply_rows(x, temperature, top_k, top_p, min_p, *, rule, divide):
    validation.report_logits(x)
    params = validation.sanitize_params(temperature, top_k, top_p, min_p)

    def block(xb, *pb):
        return sampling._on_clean_logits(xb, lambda layout: _apply_layout(layout, pb, rule, divide))

    return selection.map_row_blocks(block, x, *params)


def _apply(fn: str, logits, *, rule="inclusive", divide=False, **setting):
    (name, value), = setting.items()
    value = validation.normalize_param(name, value, FIELD_DTYPES[name])
    params = SamplingParams(**{name: value}, top_p_rule=rule)
    x, values, batch_shape = sampling._prepare(f"jsample.{fn}", logits, params)
    out = _apply_rows(x, *values, rule=rule, divide=divide)
    return out.reshape(*batch_shape, x.shape[-1])


def apply_temperature(logits: jax.Array, temperature) -> jax.Array:
    """``logits / temperature`` per row; ``temperature=0`` keeps only the first argmax.

    Args:
      logits: float ``[..., vocab]``.
      temperature: scalar or ``[...]`` per row, finite and ``>= 0``.

    Example:
      >>> import jax.numpy as jnp, jsample as js
      >>> js.apply_temperature(jnp.array([1.0, 3.0, 3.0]), 0.0).tolist()
      [-inf, 3.0, -inf]
    """
    return _apply("apply_temperature", logits, divide=True, temperature=temperature)


def mask_top_k(logits: jax.Array, top_k) -> jax.Array:
    """Keeps the ``top_k`` largest logits per row (ties with the k-th value are kept too).

    Example:
      >>> import jax.numpy as jnp, jsample as js
      >>> js.mask_top_k(jnp.array([1.0, 4.0, 2.0, 3.0]), 2).tolist()
      [-inf, 4.0, -inf, 3.0]
    """
    return _apply("mask_top_k", logits, top_k=top_k)


def mask_top_p(logits: jax.Array, top_p, rule: str = "inclusive") -> jax.Array:
    """Nucleus filter on ``softmax(logits)`` (Holtzman et al., 2019); see ``SamplingParams.top_p_rule``.

    Example:
      >>> import jax.numpy as jnp, jsample as js
      >>> logits = jnp.log(jnp.array([0.5, 0.25, 0.125, 0.125]))
      >>> [bool(v > -jnp.inf) for v in js.mask_top_p(logits, 0.6)]
      [True, True, False, False]
      >>> [bool(v > -jnp.inf) for v in js.mask_top_p(logits, 0.6, rule="exclusive")]
      [True, False, False, False]
    """
    return _apply("mask_top_p", logits, rule=rule, top_p=top_p)


def mask_min_p(logits: jax.Array, min_p) -> jax.Array:
    """Keeps tokens with ``prob >= min_p * max_prob`` (Nguyen et al., 2024).

    Example:
      >>> import jax.numpy as jnp, jsample as js
      >>> js.mask_min_p(jnp.log(jnp.array([0.6, 0.3, 0.1])), 0.25).tolist()[2]
      -inf
    """
    return _apply("mask_min_p", logits, min_p=min_p)
