"""Input checks: eager errors that name the argument, and the clamping rule for traced values.

Concrete values (Python scalars, NumPy arrays, JAX arrays outside ``jit``) are checked when they
arrive and raise ``ValueError``/``TypeError`` naming the argument and its allowed range. Traced
values cannot be checked in Python, so the samplers clamp them instead (:func:`sanitize_params`,
:func:`check_uniform`): a bad traced value never produces NaN or an out-of-range token. Each
clamp also places a ``checkify.debug_check`` when the caller runs under :func:`jsample.checked`,
which then reports the first bad value. Outside it no check is traced at all: a check is a JAX
effect, and a jitted function with an effect leaves JAX's C++ dispatch path for the Python one
(about half a millisecond per sampler call on the development machine).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jsample.params import FIELD_DTYPES, TOP_P_RULES

_RANGES = {
    "temperature": "a finite number >= 0 (0 means greedy)",
    "top_k": "an integer >= 0 (0 means off)",
    "top_p": "a number in [0, 1] (1 means off)",
    "min_p": "a number in [0, 1] (0 means off)",
}

# What a traced out-of-range value becomes, for the checked-mode messages (see sanitize_params).
_CLAMPED = {
    "temperature": "NaN or < 0 was treated as 0 (greedy), +inf as the largest float32",
    "top_k": "< 0 was treated as 0 (off)",
    "top_p": "NaN was treated as 1 (off), other values clipped to [0, 1]",
    "min_p": "NaN was treated as 0 (off), other values clipped to [0, 1]",
}


def _checked_mode_state():
    """A JAX configuration state for checked mode, part of JAX's trace and jit cache keys.

    A function traced in checked mode then never shares a cached trace with the same function
    traced outside it. The state lives in a private JAX module; should it move, every call
    traces its checks, as in checked mode (correct, only slower to dispatch). A second copy of
    jsample in the process (a vendored one, say) finds the name taken and shares the state
    registered by the first: without it, that copy would trace its checks on every call and run
    15-25% slower (measured at 64 x 128256).
    """
    try:
        from jax._src import config as jax_config
    except Exception:  # pragma: no cover - depends on JAX internals
        return None
    try:
        return jax_config.bool_state(
            "jsample_checked_mode",
            False,
            help="jsample: trace the checkify checks of jsample.checked (set by it).",
            include_in_jit_key=True,
            include_in_trace_context=True,
        )
    except Exception:
        holders = getattr(getattr(jax_config, "config", None), "_value_holders", {})
        existing = holders.get("jsample_checked_mode")
        return existing if isinstance(existing, jax_config.State) else None


CHECKED_MODE = _checked_mode_state()


def checks_enabled() -> bool:
    """True while :func:`jsample.checked` traces its function (always, without the state)."""
    return CHECKED_MODE is None or bool(CHECKED_MODE.value)


def debug_check(predicate: jax.Array, message: str, *fmt_args: Any) -> None:
    """``checkify.debug_check`` in checked mode; nothing otherwise."""
    if checks_enabled():
        checkify.debug_check(predicate, message, *fmt_args)


def is_traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def check_static_settings(top_p_rule: Any, candidates: Any) -> None:
    if not isinstance(top_p_rule, str) or top_p_rule not in TOP_P_RULES:
        raise ValueError(
            f"top_p_rule must be one of {TOP_P_RULES}, got {top_p_rule!r}."
        )
    if isinstance(candidates, bool) or not isinstance(candidates, (int, np.integer)) or candidates < 1:
        raise ValueError(f"candidates must be a Python int >= 1, got {candidates!r}.")


def _bad_mask(name: str, values: np.ndarray) -> np.ndarray:
    """float64 ``values`` -> bool mask of the entries outside ``name``'s allowed range."""
    if name == "temperature":
        return ~np.isfinite(values) | (values < 0)
    if name == "top_k":
        return ~np.isfinite(values) | (values < 0) | (values != np.round(values))
    return np.isnan(values) | (values < 0) | (values > 1)


def _raise_if_bad(name: str, values: np.ndarray) -> None:
    bad = _bad_mask(name, values.astype(np.float64))
    if not np.any(bad):
        return
    where = ""
    if values.ndim:
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        where = f" at index {index} of an array of shape {values.shape}"
    raise ValueError(f"{name} must be {_RANGES[name]}, got {values[bad].flat[0].item()!r}{where}.")


def normalize_param(name: str, value: Any, dtype: type) -> Any:
    """Returns ``value`` as an array of ``dtype``, after checking it when it is concrete.

    Objects that are not numbers (JAX tree utilities sometimes rebuild a pytree with
    placeholders) pass through untouched; :func:`check_params` rejects them before any use.
    """
    if is_traced(value):
        if not (jnp.issubdtype(value.dtype, jnp.number) or value.dtype == jnp.bool_):
            raise TypeError(f"{name} must be numeric, got dtype {value.dtype}.")
        if np.dtype(dtype).kind == "i" and not jnp.issubdtype(value.dtype, jnp.integer):
            raise TypeError(
                f"{name} must have an integer dtype under jit, got {value.dtype}. "
                f"Pass {name} as an int32 array."
            )
        return value.astype(dtype)
    if isinstance(value, bool) or (
        not isinstance(value, (int, float, np.number, np.ndarray, jax.Array))
    ):
        if isinstance(value, (bool, str, list, tuple)):
            hint = ""
            if isinstance(value, bool):
                hint = " (use an int or a float)"
            elif isinstance(value, (list, tuple)):
                hint = " (wrap per-row values in np.asarray or jnp.asarray)"
            raise TypeError(f"{name} must be a number or an array, got {type(value).__name__}{hint}.")
        return value
    host = np.asarray(value)
    if host.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be numeric, got dtype {host.dtype}.")
    _raise_if_bad(name, host)
    if np.dtype(dtype).kind == "i":
        # Any k >= vocab means off, so very large values lose nothing by saturating (in float64:
        # float32 cannot hold the int32 maximum, and the cast would wrap to a negative k).
        wide = host.astype(np.float64) if host.dtype.kind == "f" else host
        host = np.asarray(np.clip(wide, 0, np.iinfo(np.int32).max), dtype)
        return jnp.asarray(host) if isinstance(value, jax.Array) else host
    return jnp.asarray(value, dtype) if isinstance(value, jax.Array) else np.asarray(host, dtype)


def check_params(params: Any) -> None:
    from jsample.params import SamplingParams

    if not isinstance(params, SamplingParams):
        raise TypeError(
            f"params must be a jsample.SamplingParams, got {type(params).__name__}. "
            "Build one with js.SamplingParams(temperature=..., top_k=..., top_p=..., min_p=...)."
        )
    for name in FIELD_DTYPES:
        value = getattr(params, name)
        if not hasattr(value, "dtype"):
            raise TypeError(
                f"SamplingParams.{name} must be a number or an array, got "
                f"{type(value).__name__}."
            )


def report_logits(x: jax.Array) -> None:
    """Checked mode only: reports NaN, ``+inf`` and rows without a finite logit.

    Called on the ``[N, vocab]`` logits inside the jitted samplers; traces nothing unless
    :func:`jsample.checked` is active.
    """
    if x.shape[0] == 0 or not checks_enabled():
        return
    nan = jnp.any(jnp.isnan(x), axis=-1)
    posinf = jnp.any(jnp.isposinf(x), axis=-1)
    usable = jnp.any(x > -jnp.inf, axis=-1)  # NaN compares false
    where = "row {} (flat index over logits.shape[:-1])"
    debug_check(
        ~jnp.any(nan), f"jsample: logits {where} holds NaN; NaN logits count as -inf.",
        jnp.argmax(nan),
    )
    debug_check(
        ~jnp.any(posinf),
        f"jsample: logits {where} holds +inf; +inf logits count as the largest float32 "
        "(tied at the top).",
        jnp.argmax(posinf),
    )
    debug_check(
        jnp.all(usable),
        f"jsample: logits {where} has no finite logit; it got token 0 with logprob -inf "
        "(all-zero probs).",
        jnp.argmin(usable),
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
        raise ValueError(
            f"{fn}: logits have an empty vocabulary (shape {tuple(logits.shape)}); "
            "the last axis must hold at least one token."
        )
    return jnp.asarray(logits)


def axis_names(entry: Any) -> tuple[str, ...]:
    """The mesh axis names of a ``PartitionSpec`` entry or an axis argument: None, a name or
    a tuple of names."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def check_not_explicitly_sharded(logits: jax.Array, fn: str) -> None:
    """Raises when ``logits`` are sharded over mesh axes of type Explicit.

    The single-device sampler reshapes and gathers along both axes, which JAX's explicit
    sharding rejects deep inside (a ``ShardingTypeError``, or branches of a ``cond`` whose
    shardings differ); this names the ways out instead.
    """
    sharding = getattr(jax.typeof(logits), "sharding", None)
    mesh, spec = getattr(sharding, "mesh", None), getattr(sharding, "spec", None)
    if mesh is None or spec is None:
        return
    explicit = {name for name, kind in zip(mesh.axis_names, mesh.axis_types)
                if kind == jax.sharding.AxisType.Explicit}
    names = [name for entry in spec for name in axis_names(entry) if name in explicit]
    if names:
        raise ValueError(
            f"{fn}: the logits are sharded over the explicit mesh axes {names} (spec {spec}). "
            "To sample them where they lie, call jsample.sample_sharded(key, logits, params, "
            "mesh=mesh, batch_axis=..., vocab_axis=...), which draws the tokens jsample.sample "
            "would; or replicate them first: jax.sharding.reshard(logits, "
            "jax.sharding.PartitionSpec())."
        )


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


def check_uniform(u: Any, batch_shape: tuple[int, ...], fn: str) -> jax.Array:
    """float32 ``u`` with the logits' batch shape; concrete values must lie in ``[0, 1)``.

    Traced values are not clamped here: the draw treats ``u < 0`` and NaN as 0 and ``u >= 1``
    as just below 1, so they still give a token of positive probability.
    """
    if not hasattr(u, "dtype"):
        u = np.asarray(u)
    if not (jnp.issubdtype(u.dtype, jnp.floating) or jnp.issubdtype(u.dtype, jnp.integer)):
        raise TypeError(f"{fn}: u must be a real-valued array, got dtype {u.dtype}.")
    if tuple(u.shape) != tuple(batch_shape):
        raise ValueError(
            f"{fn}: u must have the logits' batch shape {tuple(batch_shape)} (one uniform per "
            f"row), got {tuple(u.shape)}."
        )
    u = jnp.asarray(u, jnp.float32)
    if is_traced(u):
        bad = ~((u >= 0) & (u < 1))
        if bad.size:
            flat = bad.reshape(-1)
            row = jnp.argmax(flat)
            debug_check(
                ~jnp.any(flat),
                f"{fn}: u must lie in [0, 1), got {{}} at row {{}}; it was treated as "
                "0 (NaN or < 0) or as just below 1 (>= 1).",
                u.reshape(-1)[row], row,
            )
        return u
    host = np.asarray(u)
    bad = ~((host >= 0) & (host < 1))
    if np.any(bad):
        where = f" at index {tuple(int(i) for i in np.argwhere(bad)[0])}" if host.ndim else ""
        raise ValueError(f"{fn}: u must lie in [0, 1), got {host[bad].flat[0].item()!r}{where}.")
    return u


def _report_params(**values: jax.Array) -> None:
    if not checks_enabled():
        return
    for name, value in values.items():
        if value.size == 0:
            continue
        if name == "temperature":
            bad = ~(value >= 0) | jnp.isinf(value)
        elif name == "top_k":
            bad = value < 0
        else:
            bad = ~((value >= 0) & (value <= 1))
        row = jnp.argmax(bad)
        debug_check(
            ~jnp.any(bad),
            f"SamplingParams.{name} must be {_RANGES[name]}, got {{}} at row {{}} (flat index "
            f"over logits.shape[:-1]); {_CLAMPED[name]}.",
            value[row], row,
        )


def sanitize_params(temperature, top_k, top_p, min_p):
    """Clamps traced ``[N]`` parameters so bad values can never produce NaN or a bad token.

    The rule: a NaN or negative temperature means greedy and ``+inf`` the largest finite
    float32 (near-uniform); a negative ``top_k`` means off; ``top_p`` and ``min_p`` are clipped
    to ``[0, 1]``, with NaN meaning off (``top_p=1``, ``min_p=0``). Under :func:`jsample.checked`
    the first value that needed clamping is reported.
    """
    _report_params(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    fmax = jnp.finfo(jnp.float32).max
    temperature = jnp.where(jnp.isnan(temperature) | (temperature < 0), 0.0, temperature)
    temperature = jnp.minimum(temperature, fmax)
    top_k = jnp.maximum(top_k, 0)
    top_p = jnp.clip(jnp.where(jnp.isnan(top_p), 1.0, top_p), 0.0, 1.0)
    min_p = jnp.clip(jnp.where(jnp.isnan(min_p), 0.0, min_p), 0.0, 1.0)
    return temperature, top_k, top_p, min_p
