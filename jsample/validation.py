"""Input checks: eager errors that name the argument, and the clamping rule for traced values.

Concrete values (Python scalars, NumPy arrays, JAX arrays outside ``jit``) are checked when they
arrive and raise ``ValueError``/``TypeError``. Traced values cannot be checked in Python, so the
samplers clamp them instead (see :func:`sanitize_params`); ``jsample.checked`` reports them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jsample.params import TOP_P_RULES

_RANGES = {
    "temperature": "a finite number >= 0 (0 means greedy)",
    "top_k": "an integer >= 0 (0 means off)",
    "top_p": "a number in [0, 1] (1 means off)",
    "min_p": "a number in [0, 1] (0 means off)",
}


def is_traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def check_static_settings(top_p_rule: Any, candidates: Any) -> None:
    if top_p_rule not in TOP_P_RULES:
        raise ValueError(
            f"top_p_rule must be one of {TOP_P_RULES}, got {top_p_rule!r}."
        )
    if isinstance(candidates, bool) or not isinstance(candidates, (int, np.integer)) or candidates < 1:
        raise ValueError(f"candidates must be a Python int >= 1, got {candidates!r}.")


def _check_values(name: str, values: np.ndarray) -> None:
    bad = None
    if name == "temperature":
        bad = ~np.isfinite(values) | (values < 0)
    elif name == "top_k":
        bad = values < 0
    elif name in ("top_p", "min_p"):
        bad = np.isnan(values) | (values < 0) | (values > 1)
    if bad is not None and np.any(bad):
        first = values[bad].flat[0]
        raise ValueError(f"{name} must be {_RANGES[name]}, got {first!r}.")


def normalize_param(name: str, value: Any, dtype: type) -> Any:
    """Returns ``value`` as an array of ``dtype``, after checking it when it is concrete.

    Objects that are not numbers (JAX tree utilities sometimes rebuild a pytree with
    placeholders) pass through untouched.
    """
    if is_traced(value):
        if not (jnp.issubdtype(value.dtype, jnp.number) or value.dtype == jnp.bool_):
            raise TypeError(f"{name} must be numeric, got dtype {value.dtype}.")
        if np.dtype(dtype).kind == "i" and not jnp.issubdtype(value.dtype, jnp.integer):
            raise TypeError(f"{name} must have an integer dtype under jit, got {value.dtype}.")
        return value.astype(dtype)
    if isinstance(value, bool) or (
        not isinstance(value, (int, float, np.number, np.ndarray, jax.Array))
    ):
        if isinstance(value, (bool, str, list, tuple)):
            raise TypeError(f"{name} must be a number or an array, got {type(value).__name__}.")
        return value
    host = np.asarray(value)
    if host.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be numeric, got dtype {host.dtype}.")
    if np.dtype(dtype).kind == "i":
        if host.dtype.kind == "f":
            if not np.all(np.isfinite(host)) or np.any(host != np.round(host)):
                raise ValueError(f"{name} must be {_RANGES[name]}, got {host!r}.")
        _check_values(name, host.astype(np.float64))
        host = np.clip(host, 0, np.iinfo(np.int32).max)
    else:
        _check_values(name, host.astype(np.float64))
    if isinstance(value, jax.Array):
        return jnp.asarray(value, dtype)
    return np.asarray(host, dtype)


def check_params(params: Any) -> None:
    from jsample.params import SamplingParams

    if not isinstance(params, SamplingParams):
        raise TypeError(
            f"params must be a jsample.SamplingParams, got {type(params).__name__}. "
            "Build one with js.SamplingParams(temperature=..., top_k=..., top_p=..., min_p=...)."
        )


def check_logits(logits: Any, fn: str) -> jax.Array:
    """Returns the logits as a JAX array after checking dtype and shape."""
    if not hasattr(logits, "dtype") or not hasattr(logits, "shape"):
        if isinstance(logits, (list, tuple)):
            logits = np.asarray(logits)
        else:
            raise TypeError(f"{fn}: logits must be an array, got {type(logits).__name__}.")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(
            f"{fn}: logits must have a floating dtype (float32, bfloat16, float16), "
            f"got {logits.dtype}. Cast with logits.astype(jnp.float32)."
        )
    if logits.ndim == 0:
        raise ValueError(f"{fn}: logits must have shape [..., vocab], got a 0-d array.")
    if logits.shape[-1] == 0:
        raise ValueError(f"{fn}: logits have an empty vocabulary (shape {tuple(logits.shape)}).")
    return jnp.asarray(logits)


def broadcast_param(name: str, value: Any, batch_shape: tuple[int, ...], dtype: type) -> jax.Array:
    """Broadcasts one parameter to ``batch_shape``; the error names the field and both shapes."""
    shape = tuple(np.shape(value))
    try:
        target = np.broadcast_shapes(shape, batch_shape)
    except ValueError:
        target = None
    if target != tuple(batch_shape):
        raise ValueError(
            f"SamplingParams.{name} has shape {shape}, which does not broadcast to the logits' "
            f"batch shape {tuple(batch_shape)} (logits.shape[:-1]). Give a scalar or one value per row."
        )
    return jnp.broadcast_to(jnp.asarray(value, dtype), batch_shape)


def check_key(key: Any, batch_shape: tuple[int, ...], fn: str) -> tuple[jax.Array, bool]:
    """Returns ``(typed_key, batched)``: one key, or one key per row with the batch shape."""
    if not hasattr(key, "dtype"):
        raise TypeError(
            f"{fn}: key must be a JAX PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)), "
            f"got {type(key).__name__}."
        )
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        typed = key
    elif key.dtype == jnp.uint32 and key.ndim >= 1 and key.shape[-1] == 2:
        typed = jax.random.wrap_key_data(key)
    else:
        raise TypeError(
            f"{fn}: key must be a JAX PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)), "
            f"got an array of dtype {key.dtype} and shape {tuple(key.shape)}."
        )
    if typed.shape == ():
        return typed, False
    if tuple(typed.shape) != tuple(batch_shape):
        raise ValueError(
            f"{fn}: a batch of keys must have the logits' batch shape {tuple(batch_shape)}, "
            f"got key batch shape {tuple(typed.shape)}. Pass one key, or one key per row."
        )
    return typed, True


def sanitize_params(temperature, top_k, top_p, min_p):
    """Clamps traced parameters so bad values can never produce NaN or an out-of-range token.

    The rule (documented in README, "Guarantees"): a NaN or negative temperature means greedy and
    ``+inf`` the largest finite float; a negative ``top_k`` means off; ``top_p`` and ``min_p`` are
    clipped to ``[0, 1]``, with NaN meaning off (``top_p=1``, ``min_p=0``).
    """
    fmax = jnp.finfo(jnp.float32).max
    temperature = jnp.where(jnp.isnan(temperature) | (temperature < 0), 0.0, temperature)
    temperature = jnp.minimum(temperature, fmax)
    top_k = jnp.maximum(top_k, 0)
    top_p = jnp.clip(jnp.where(jnp.isnan(top_p), 1.0, top_p), 0.0, 1.0)
    min_p = jnp.clip(jnp.where(jnp.isnan(min_p), 0.0, min_p), 0.0, 1.0)
    return temperature, top_k, top_p, min_p
