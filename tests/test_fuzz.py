"""Property-based fuzzing: random shapes, dtypes, parameter values (valid and invalid, scalars and
per row), NaN/inf patterns and keys thrown at ``sample``, ``probs`` and ``decode``.

Every example must end in a clear error (``ValueError``/``TypeError`` naming the argument) or a
valid result: right shape and dtype, tokens in range and of positive probability, no NaN,
distributions that sum to 1 (or are all zero for a row without a finite logit).

Compilation is kept in check: every batch shape flattens to the same 6 rows of 257 tokens, so
each (dtype, top-p rule) compiles once, and the traced tests run a single compiled program each.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import jsample as js
from checked_program import traced_program

ROWS, V = 6, 257
NAN, INF = float("nan"), float("inf")
FIELDS = ("temperature", "top_k", "top_p", "min_p")
VALID = {
    "temperature": lambda v: np.isfinite(v) and v >= 0,
    "top_k": lambda v: np.isfinite(v) and v >= 0 and v == int(v),
    "top_p": lambda v: 0 <= v <= 1,
    "min_p": lambda v: 0 <= v <= 1,
}
POOLS = {
    "temperature": [0.0, 1e-8, 0.5, 1.0, 3.0, 1e6, -1.0, NAN, INF],
    "top_k": [0, 1, 3, 64, 65, 300, -1, 2.5],
    "top_p": [0.0, 0.3, 0.9, 0.999, 1.0, -0.1, 1.5, NAN],
    "min_p": [0.0, 0.05, 0.5, 1.0, -0.5, 2.0, NAN],
}
BATCH_SHAPES = [(6,), (2, 3), (3, 2), (1, 6), (6, 1)]
# Exclusive top-p only in float32, so that every (dtype, rule) pair compiles once.
DTYPE_RULES = [(jnp.float32, "inclusive"), (jnp.float32, "exclusive"),
               (jnp.bfloat16, "inclusive"), (jnp.float16, "inclusive")]
BIG = {jnp.float32: 1e30, jnp.bfloat16: 1e38, jnp.float16: 6e4}
PATTERNS = ["clean", "clean", "nan_some", "pos_inf_some", "neg_inf_some", "all_nan", "all_neg_inf",
            "single_finite", "huge"]
NO_FINITE = {"all_nan", "all_neg_inf"}


def _rows_of(patterns, seed, scale, big):
    """float32 ``[len(patterns), V]`` logits, row ``r`` corrupted by ``patterns[r]``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, scale, (len(patterns), V)).astype(np.float32)
    for row, pattern in enumerate(patterns):
        where = rng.choice(V, size=rng.integers(1, 20), replace=False)
        if pattern == "nan_some":
            x[row, where] = NAN
        elif pattern == "pos_inf_some":
            x[row, where] = INF
        elif pattern == "neg_inf_some":
            x[row, where] = -INF
        elif pattern == "all_nan":
            x[row] = NAN
        elif pattern == "all_neg_inf":
            x[row] = -INF
        elif pattern == "single_finite":
            x[row] = rng.choice([NAN, -INF], V)
            x[row, where[0]] = 0.25
        elif pattern == "huge":
            x[row] = rng.uniform(-big, big, V)
    return x


@st.composite
def logits_cases(draw):
    dtype, rule = draw(st.sampled_from(DTYPE_RULES))
    patterns = draw(st.lists(st.sampled_from(PATTERNS), min_size=ROWS, max_size=ROWS))
    x = _rows_of(patterns, draw(st.integers(0, 2**16)), draw(st.sampled_from([0.01, 2.0, 50.0])), BIG[dtype])
    return dtype, rule, patterns, x


@st.composite
def param_values(draw, batch_shape=None):
    """Each field: a scalar, or (with ``batch_shape``) an array that broadcasts to it."""
    out = {}
    # Mostly valid values: with invalid ones allowed everywhere, nearly every per-row example
    # would hold one, and the valid path would hardly run.
    allow_invalid = draw(st.booleans())
    for name in FIELDS:
        pool = [v for v in POOLS[name] if allow_invalid or VALID[name](v)]
        shapes = [()] if batch_shape is None else [(), batch_shape, batch_shape[-1:], (1,) * len(batch_shape)]
        shape = draw(st.sampled_from(shapes))
        size = int(np.prod(shape))
        values = draw(st.lists(st.sampled_from(pool), min_size=size, max_size=size))
        out[name] = values[0] if shape == () else np.array(values, np.float32).reshape(shape)
    return out


def _per_row(values):
    return {name: np.broadcast_to(np.asarray(v), (ROWS,)) for name, v in values.items()}


def _first_invalid(values):
    for name in FIELDS:
        if not all(VALID[name](float(v)) for v in np.ravel(values[name])):
            return name
    return None


def _check_result(tokens, logprobs, probs, patterns, batch_shape):
    """The invariants of a valid result. ``patterns`` per flattened row."""
    tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
    probs = np.asarray(probs, np.float64)
    assert tokens.shape == batch_shape and tokens.dtype == np.int32
    assert logprobs.shape == batch_shape and logprobs.dtype == np.float32
    assert probs.shape == batch_shape + (V,)
    tokens, logprobs, probs = tokens.reshape(-1), logprobs.reshape(-1), probs.reshape(-1, V)
    assert np.all((tokens >= 0) & (tokens < V))
    assert not np.any(np.isnan(logprobs)) and not np.any(np.isnan(probs))
    assert np.all(logprobs <= 1e-6) and np.all((probs >= 0) & (probs <= 1 + 1e-6))
    for row, pattern in enumerate(patterns):
        if pattern in NO_FINITE:
            assert tokens[row] == 0 and logprobs[row] == -np.inf and np.all(probs[row] == 0)
        else:
            assert abs(probs[row].sum() - 1.0) < 1e-5
            p = probs[row, tokens[row]]
            assert p > 0 and np.isfinite(logprobs[row])
            if p > 1e-30:
                assert abs(logprobs[row] - np.log(p)) < 1e-3 * max(1.0, abs(np.log(p)))


@settings(max_examples=60)
@given(case=logits_cases(), batch_shape=st.sampled_from(BATCH_SHAPES), data=st.data())
def test_sample_and_probs_give_a_clear_error_or_a_valid_result(case, batch_shape, data):
    dtype, rule, patterns, x = case
    values = data.draw(param_values(batch_shape))
    logits = jnp.asarray(x.reshape(batch_shape + (V,))).astype(dtype)
    per_row_key = data.draw(st.booleans())
    key = jax.random.split(jax.random.key(0), batch_shape) if per_row_key else jax.random.key(1)

    invalid = _first_invalid(values)
    event(f"invalid {invalid}" if invalid else f"valid {jnp.dtype(dtype).name} {rule}")
    if invalid is not None:
        with pytest.raises(ValueError, match=rf"^{invalid} must be "):
            js.SamplingParams(**values, top_p_rule=rule)
        return
    params = js.SamplingParams(**values, top_p_rule=rule)
    tokens, logprobs = js.sample(key, logits, params, return_logprobs=True)
    probs = js.probs(logits, params)
    # Every batch shape is a row-major reshape of the 6 rows, so patterns stay in flat order.
    _check_result(tokens, logprobs, probs, patterns, batch_shape)


@settings(max_examples=30)
@given(batch_shape=st.sampled_from(BATCH_SHAPES), wrong=st.sampled_from(["key", "param", "u"]),
       data=st.data())
def test_mismatched_shapes_raise_naming_the_argument(batch_shape, wrong, data):
    logits = jnp.zeros(batch_shape + (V,))
    bad_shape = data.draw(st.sampled_from([(5,), (7,), (2, 2), batch_shape + (2,)]))
    if wrong == "key":
        keys = jax.random.split(jax.random.key(0), int(np.prod(bad_shape))).reshape(bad_shape)
        message = r"jsample\.sample: a batch of keys must have the logits' batch shape"
        with pytest.raises(ValueError, match=message):
            js.sample(keys, logits)
    elif wrong == "param":
        name = data.draw(st.sampled_from(FIELDS))
        params = js.SamplingParams(**{name: np.zeros(bad_shape, np.int32 if name == "top_k" else np.float32)})
        with pytest.raises(ValueError, match=rf"SamplingParams\.{name} has shape"):
            js.probs(logits, params)
    else:
        with pytest.raises(ValueError, match=r"u must have the logits' batch shape"):
            js.sample_from_uniform(np.zeros(bad_shape, np.float32), logits)


@settings(max_examples=40)
@given(case=logits_cases(), data=st.data())
def test_traced_values_never_raise_and_checked_mode_reports_exactly_the_bad_ones(case, data):
    _, _, patterns, x = case
    values = _per_row(data.draw(param_values((ROWS,))))
    u = np.asarray(data.draw(st.lists(st.sampled_from([0.0, 0.3, 0.999, -0.5, 1.0, NAN]),
                                      min_size=ROWS, max_size=ROWS)), np.float32)
    # top_k is int32 under jit: 2.5 has no traced form, -1 stays as the invalid value.
    top_k = np.where(values["top_k"] == 2.5, -1, values["top_k"]).astype(np.int32)
    values["top_k"] = top_k
    f32 = lambda name: np.asarray(values[name], np.float32)
    err, (tokens, logprobs, probs, replay) = traced_program(
        jax.random.split(jax.random.key(2), ROWS), jnp.asarray(x), f32("temperature"), top_k,
        f32("top_p"), f32("min_p"), jnp.asarray(u))
    _check_result(tokens, logprobs, probs, patterns, (ROWS,))
    replay = np.asarray(replay)
    assert np.all((replay >= 0) & (replay < V))
    finite = [row for row, pattern in enumerate(patterns) if pattern not in NO_FINITE]
    assert np.all(np.asarray(probs)[finite, replay[finite]] > 0)

    bad_params = _first_invalid(values) is not None
    bad_logits = np.isnan(x).any() or np.isposinf(x).any() or not np.all(np.any(x > -np.inf, axis=-1))
    bad_u = not np.all((u >= 0) & (u < 1))
    assert (err.get() is not None) == (bad_params or bad_logits or bad_u)


def _bigram(table, tokens):
    """A "model" whose next logits are a row of a table: ``table[tokens]``."""
    return table[tokens], table


@jax.jit
def _decode(table, logits, keys, eos_id, temperature, top_k, top_p, min_p):
    params = js.SamplingParams(temperature, top_k, top_p, min_p)
    return js.decode(_bigram, table, logits, keys, params, max_new_tokens=5, eos_id=eos_id, pad_id=V - 1)


@settings(max_examples=15)
@given(case=logits_cases(), table_seed=st.integers(0, 2**16), eos_id=st.sampled_from([0, 1, 7, 200]),
       data=st.data())
def test_decode_gives_valid_sequences_under_any_values(case, table_seed, eos_id, data):
    _, _, patterns, x = case
    values = _per_row(data.draw(param_values((ROWS,))))
    # The next logits of token t are row t of the table, itself corrupted row by row.
    table = _rows_of(np.random.default_rng(table_seed).choice(PATTERNS, V), table_seed, 3.0, 1e30)
    top_k = np.where(values["top_k"] == 2.5, -1, values["top_k"]).astype(np.int32)
    out = _decode(jnp.asarray(table), jnp.asarray(x), jax.random.split(jax.random.key(3), ROWS),
                  jnp.int32(eos_id), np.asarray(values["temperature"], np.float32), top_k,
                  np.asarray(values["top_p"], np.float32), np.asarray(values["min_p"], np.float32))
    tokens, lengths, logprobs = (np.asarray(a) for a in (out.tokens, out.lengths, out.logprobs))
    assert tokens.shape == (ROWS, 5) and lengths.shape == (ROWS,)
    assert np.all((lengths >= 1) & (lengths <= 5))
    assert not np.any(np.isnan(logprobs)) and np.all(logprobs <= 1e-6)
    for row in range(ROWS):
        generated = tokens[row, : lengths[row]]
        assert np.all((generated >= 0) & (generated < V))
        assert np.all(tokens[row, lengths[row]:] == V - 1) and np.all(logprobs[row, lengths[row]:] == 0)
        # A row stops exactly at its first eos token.
        stops = np.flatnonzero(generated == eos_id)
        assert (lengths[row] == 5 and stops.size == 0) or (stops.size and stops[0] == lengths[row] - 1)
