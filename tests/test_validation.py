"""Bad input: eager errors that name the argument, the clamping rule under jit, and checked mode.

Eager checks raise before anything compiles, so most of this module costs no XLA compilation.
The jitted tests share one batch shape with the other hardening modules (and tests/test_core.py).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsample as js
from checked_program import traced_program
from jsample import validation

B, V = 6, 257
FMAX = float(jnp.finfo(jnp.float32).max)
NAN, INF = float("nan"), float("inf")


def _logits(seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(0.0, 2.0, (B, V)), jnp.float32)


def _keys(seed=0):
    return jax.random.split(jax.random.key(seed), B)


class TestParameterValues:
    @pytest.mark.parametrize("field, value, allowed", [
        ("temperature", -1.0, r">= 0"),
        ("temperature", NAN, r">= 0"),
        ("temperature", INF, r"finite"),
        ("temperature", -INF, r"finite"),
        ("top_p", 1.5, r"\[0, 1\]"),
        ("top_p", -0.1, r"\[0, 1\]"),
        ("top_p", NAN, r"\[0, 1\]"),
        ("top_k", -1, r"integer >= 0"),
        ("top_k", 2.5, r"integer >= 0"),
        ("top_k", INF, r"integer >= 0"),
        ("min_p", -0.1, r"\[0, 1\]"),
        ("min_p", 1.01, r"\[0, 1\]"),
        ("min_p", NAN, r"\[0, 1\]"),
    ])
    def test_out_of_range_values_raise_naming_field_range_and_value(self, field, value, allowed):
        with pytest.raises(ValueError, match=rf"^{field} must be .*{allowed}.*, got {value!r}\.$"):
            js.SamplingParams(**{field: value})

    @pytest.mark.parametrize("field, values, index", [
        ("temperature", np.array([0.5, 1.0, -2.0]), (2,)),
        ("top_k", jnp.array([[1, 2], [-3, 4]]), (1, 0)),
        ("min_p", np.array([0.1, NAN], np.float32), (1,)),
    ])
    def test_array_errors_point_at_the_first_bad_entry(self, field, values, index):
        with pytest.raises(ValueError, match=rf"{field} must be .* at index {re_tuple(index)}"):
            js.SamplingParams(**{field: values})

    @pytest.mark.parametrize("field, value, kind", [
        ("temperature", True, "bool"),
        ("top_k", "5", "str"),
        ("top_p", [0.9, 0.8], "list"),
        ("min_p", np.array(["a"]), "numeric"),
        ("top_p", np.array([1 + 1j]), "numeric"),
    ])
    def test_non_numbers_raise_type_error(self, field, value, kind):
        with pytest.raises(TypeError, match=rf"^{field} must be .*{kind}"):
            js.SamplingParams(**{field: value})

    def test_boundary_values_are_accepted_and_stored_as_float32_and_int32(self):
        params = js.SamplingParams(temperature=0.0, top_k=0, top_p=0.0, min_p=1.0)
        assert params.temperature.dtype == np.float32 and params.top_k.dtype == np.int32
        params = js.SamplingParams(temperature=1e30, top_k=3.0, top_p=1.0, min_p=0.0)
        assert int(params.top_k) == 3

    def test_huge_top_k_saturates_instead_of_wrapping_negative(self):
        # float32 cannot hold 2**31 - 1: a naive cast of 3e9 would wrap to a negative k.
        for value in (1e10, np.float32(3e9), np.int64(2**40)):
            assert int(js.SamplingParams(top_k=value).top_k) == np.iinfo(np.int32).max

    def test_static_settings(self):
        rules = r"\('inclusive', 'exclusive'\)"
        with pytest.raises(ValueError, match=rf"top_p_rule must be one of {rules}, got 'nucleus'"):
            js.SamplingParams(top_p_rule="nucleus")
        with pytest.raises(ValueError, match=r"candidates must be a Python int >= 1, got 0"):
            js.SamplingParams(candidates=0)
        with pytest.raises(ValueError, match="candidates"):
            js.SamplingParams(candidates=8.0)

    def test_params_must_be_a_sampling_params(self):
        with pytest.raises(TypeError, match=r"params must be a jsample.SamplingParams, got dict"):
            js.sample(jax.random.key(0), _logits(), {"temperature": 0.7})

    def test_a_rebuilt_params_with_a_placeholder_leaf_is_rejected_on_use(self):
        params = js.SamplingParams().replace(top_p=None)
        message = r"SamplingParams.top_p must be a number or an array, got NoneType"
        with pytest.raises(TypeError, match=message):
            js.probs(_logits(), params)

    def test_float_top_k_under_jit_raises(self):
        step = jax.jit(lambda k: js.SamplingParams(top_k=k).top_k)
        with pytest.raises(TypeError, match=r"top_k must have an integer dtype under jit, got float32"):
            step(jnp.float32(3.0))


def re_tuple(index):
    return "\\(" + ", ".join(str(i) for i in index) + ("," if len(index) == 1 else "") + "\\)"


# Each public entry point takes logits; every one of them must reject bad ones the same way.
ENTRY_POINTS = {
    "sample": lambda x: js.sample(jax.random.key(0), x),
    "sample_from_uniform": lambda x: js.sample_from_uniform(jnp.zeros(np.shape(x)[:-1]), x),
    "probs": js.probs,
    "log_probs": js.log_probs,
    "mask_top_p": lambda x: js.mask_top_p(x, 0.9),
}


class TestLogits:
    @pytest.mark.parametrize("fn", ENTRY_POINTS)
    @pytest.mark.parametrize("logits, error, message", [
        (jnp.arange(6).reshape(2, 3), TypeError, r"logits must have a floating dtype .* got int32"),
        (np.ones((2, 3), bool), TypeError, r"logits must have a floating dtype .* got bool"),
        (np.ones((2, 3), np.complex64), TypeError, r"logits must have a floating dtype"),
        (jnp.float32(1.0), ValueError, r"logits must have shape \[\.\.\., vocab\], got a 0-d array"),
        (jnp.zeros((4, 0)), ValueError, r"logits have an empty vocabulary \(shape \(4, 0\)\)"),
        ("logits", TypeError, r"logits must be an array, got str"),
    ])
    def test_bad_logits_raise_naming_the_function(self, fn, logits, error, message):
        name = "(log_)?probs" if fn == "probs" else fn  # probs is exp(log_probs)
        with pytest.raises(error, match=rf"^jsample\.{name}: {message}"):
            ENTRY_POINTS[fn](logits)


class TestKeys:
    @pytest.mark.parametrize("key, message", [
        (0, r"got int\."),
        (jnp.zeros((2,), jnp.float32), r"got an array of dtype float32 and shape \(2,\)"),
        (jnp.zeros((3,), jnp.uint32), r"got an array of dtype uint32 and shape \(3,\)"),
        (np.zeros((2,), np.int32), r"got an array of dtype int32"),
    ])
    def test_non_keys_raise_type_error(self, key, message):
        with pytest.raises(TypeError, match=rf"^jsample\.sample: key must be a JAX PRNG key.*{message}"):
            js.sample(key, _logits())

    @pytest.mark.parametrize("shape", [(3,), (B, 1), (1, B)])
    def test_key_batch_must_match_the_logits_batch(self, shape):
        keys = jax.random.split(jax.random.key(0), int(np.prod(shape))).reshape(shape)
        message = rf"logits' batch shape \({B},\), got key batch shape {re_tuple(shape)}"
        with pytest.raises(ValueError, match=message):
            js.sample(keys, _logits())

    def test_legacy_uint32_keys_are_accepted_singly_and_per_row(self):
        logits = _logits()
        typed = js.sample(_keys(), logits)
        legacy = js.sample(jax.random.key_data(_keys()), logits)
        assert np.array_equal(typed, legacy)


class TestParameterShapes:
    @pytest.mark.parametrize("field, value", [
        ("temperature", jnp.ones(3)),
        ("top_k", jnp.ones((B, 1), jnp.int32)),
        ("top_p", jnp.ones((2, B))),
        ("min_p", np.zeros(B + 1)),
    ])
    def test_parameters_that_do_not_broadcast_to_the_batch_raise(self, field, value):
        params = js.SamplingParams(**{field: value})
        shape = re_tuple(np.shape(value))
        calls = (lambda: js.sample(jax.random.key(0), _logits(), params),
                 lambda: js.probs(_logits(), params))
        for fn in calls:
            with pytest.raises(ValueError, match=rf"SamplingParams\.{field} has shape {shape}, .* \({B},\)"):
                fn()

    def test_parameters_broadcast_against_a_multi_dimensional_batch(self):
        logits = _logits().reshape(2, 3, V)
        params = js.SamplingParams(temperature=jnp.array([[0.0], [1.0]]), top_k=jnp.array([1, 2, 3]))
        assert js.sample(jax.random.key(0), logits, params).shape == (2, 3)


class TestUniforms:
    @pytest.mark.parametrize("u, bad", [(-0.25, "-0.25"), (1.0, "1.0"), (NAN, "nan"), (INF, "inf")])
    def test_concrete_uniforms_outside_the_unit_interval_raise(self, u, bad):
        us = np.full((B,), 0.5, np.float32)
        us[4] = u
        with pytest.raises(ValueError, match=rf"u must lie in \[0, 1\), got {bad} at index \(4,\)"):
            js.sample_from_uniform(us, _logits())

    def test_uniforms_must_have_the_batch_shape(self):
        with pytest.raises(ValueError, match=rf"u must have the logits' batch shape \({B},\) .* got \(\)"):
            js.sample_from_uniform(0.5, _logits())


# The documented rule for traced values (validation.sanitize_params): for each row, the invalid
# value on the left behaves exactly as the valid value on the right.
CLAMPED = [
    # temperature, top_k, top_p, min_p        ->  temperature, top_k, top_p, min_p
    ((-1.0, 0, 1.0, 0.0), (0.0, 0, 1.0, 0.0)),
    ((NAN, 5, 0.9, 0.0), (0.0, 5, 0.9, 0.0)),
    ((INF, 0, 1.0, 0.0), (FMAX, 0, 1.0, 0.0)),
    ((1.0, -4, -0.5, 0.0), (1.0, 0, 0.0, 0.0)),
    ((0.8, 20, 2.0, -1.0), (0.8, 20, 1.0, 0.0)),
    ((1.2, 0, NAN, NAN), (1.2, 0, 1.0, 0.0)),
]
# min_p above 1 is tested separately: it keeps only the top token(s), exactly like min_p = 1.


def _columns(rows):
    t, k, p, m = zip(*rows)
    return (jnp.array(t, jnp.float32), jnp.array(k, jnp.int32), jnp.array(p, jnp.float32),
            jnp.array(m, jnp.float32))


def _traced(keys, logits, temperature, top_k, top_p, min_p, u=0.5):
    """Every test of traced values runs this one compiled program, in checked mode.

    Returns ``(err, (tokens, logprobs, probs, replayed tokens))``; the outputs are those of the
    unchecked functions (tested below), so the clamping tests read them too. Arguments go
    through NumPy with fixed dtypes so that no call differs in weak type and recompiles.
    """
    f32 = lambda a: np.broadcast_to(np.asarray(a, np.float32), (B,))
    return traced_program(keys, logits, f32(temperature), np.broadcast_to(np.asarray(top_k, np.int32), (B,)),
                           f32(top_p), f32(min_p), f32(u))


class TestTracedValues:
    def test_invalid_traced_values_follow_the_clamping_rule(self):
        logits = _logits(1)
        invalid = _columns([row for row, _ in CLAMPED])
        valid = js.SamplingParams(*_columns([row for _, row in CLAMPED]))
        for seed in range(3):
            _, (tokens, logprobs, probs, _) = _traced(_keys(seed), logits, *invalid)
            expected, expected_lp = js.sample(_keys(seed), logits, valid, return_logprobs=True)
            assert np.array_equal(tokens, expected)
            np.testing.assert_allclose(logprobs, expected_lp, rtol=1e-6)
        np.testing.assert_allclose(probs, js.probs(logits, valid), rtol=1e-6, atol=1e-12)

    def test_min_p_above_one_keeps_the_top_token(self):
        logits = _logits(2)
        t, k, p, m = _columns([(1.0, 0, 1.0, 5.0)] * B)
        _, (tokens, logprobs, probs, _) = _traced(_keys(), logits, t, k, p, m)
        top = np.argmax(np.asarray(logits), axis=-1)
        assert np.array_equal(tokens, top)
        assert np.array_equal(probs, jax.nn.one_hot(top, V))

    def test_traced_garbage_never_gives_nan_or_an_out_of_range_token(self):
        rng = np.random.default_rng(3)
        pool = np.array([-INF, -1e30, -1.0, -1e-30, 0.0, 1e-30, 0.5, 1.0, 7.0, 1e30, INF, NAN], np.float32)
        logits = _logits(3)
        for seed in range(4):
            t, p, m = (jnp.asarray(rng.choice(pool, B)) for _ in range(3))
            k = jnp.asarray(rng.integers(-2**31, 2**31 - 1, B), jnp.int32)
            _, (tokens, logprobs, probs, _) = _traced(_keys(seed), logits, t, k, p, m)
            assert np.all((np.asarray(tokens) >= 0) & (np.asarray(tokens) < V))
            assert not np.any(np.isnan(logprobs)) and not np.any(np.isnan(probs))
            np.testing.assert_allclose(np.sum(probs, axis=-1), 1.0, rtol=1e-5)
            assert np.all(np.asarray(probs)[np.arange(B), tokens] > 0)

    def test_traced_uniforms_outside_the_unit_interval_still_give_a_kept_token(self):
        # The first token is removed (-inf); a uniform < 0 or NaN used to select it regardless.
        logits = _logits(4).at[:, 0].set(-jnp.inf)
        columns = _columns([(1.0, 3, 1.0, 0.0)] * B)
        u = jnp.array([-0.5, NAN, -INF, 1.0, 7.0, INF])
        _, (*_, tokens) = _traced(_keys(), logits, *columns, u)
        params = js.SamplingParams(*columns)
        probs = np.asarray(js.probs(logits, params))
        assert np.all(probs[np.arange(B), tokens] > 0)
        # NaN and u < 0 act as u = 0; u >= 1 acts as the largest float32 below 1.
        below_one = np.nextafter(np.float32(1), np.float32(0))
        ends = jnp.array([0.0, 0.0, 0.0, below_one, below_one, below_one])
        assert np.array_equal(tokens, js.sample_from_uniform(ends, logits, params))


class TestCheckedMode:
    def test_plain_programs_trace_no_check(self):
        # A check is a JAX effect, and a jitted function with one is dispatched by JAX's slow
        # Python path: outside checked mode the samplers must trace none.
        params = js.SamplingParams(temperature=jnp.ones(B), top_p=jnp.full(B, 0.9))

        def program(keys, logits, u):
            return (js.sample(keys, logits, params), js.probs(logits, params),
                    js.sample_from_uniform(u, logits, params))

        args = (_keys(), _logits(5), jnp.full(B, 0.5))
        assert not jax.make_jaxpr(program)(*args).effects
        with validation.CHECKED_MODE(True):  # what js.checked traces: the checks are there
            assert jax.make_jaxpr(program)(*args).effects

    def test_a_second_copy_of_jsample_shares_the_state(self):
        # A second copy (vendored, or loaded under another name) cannot register the state's name
        # again; without the first copy's state it would trace its checks on every call.
        assert validation.CHECKED_MODE is not None
        assert validation._checked_mode_state() is validation.CHECKED_MODE
        assert not validation.checks_enabled()
        with validation.CHECKED_MODE(True):
            assert validation.checks_enabled()

    def test_a_function_jitted_and_run_plainly_first_is_still_checked(self):
        # Checked mode is part of JAX's trace cache key, so checkify never reuses the plain trace.
        step = jax.jit(lambda keys, logits, t: js.sample(keys, logits, js.SamplingParams(temperature=t)))
        bad = jnp.full(B, -1.0)
        plain = step(_keys(), _logits(6), bad)
        err, checked_tokens = js.checked(step)(_keys(), _logits(6), bad)
        assert "temperature must be a finite number >= 0" in err.get()
        assert np.array_equal(plain, checked_tokens)
        assert np.array_equal(step(_keys(), _logits(6), bad), plain)

    def _run(self, logits=None, temperature=None, top_p=None, u=None):
        logits = _logits(5) if logits is None else logits
        temperature = jnp.ones(B) if temperature is None else temperature
        top_p = jnp.full(B, 0.9) if top_p is None else top_p
        u = jnp.full(B, 0.5) if u is None else u
        return _traced(_keys(), logits, temperature, jnp.zeros(B, jnp.int32), top_p, jnp.zeros(B), u)

    def test_clean_input_reports_nothing_and_changes_nothing(self):
        err, (tokens, logprobs, probs, replay) = self._run()
        assert err.get() is None
        params = js.SamplingParams(temperature=jnp.ones(B), top_p=jnp.full(B, 0.9))
        expected, expected_lp = js.sample(_keys(), _logits(5), params, return_logprobs=True)
        assert np.array_equal(tokens, expected)
        np.testing.assert_allclose(logprobs, expected_lp, rtol=1e-6)
        np.testing.assert_allclose(probs, js.probs(_logits(5), params), rtol=1e-6)
        assert np.array_equal(replay, js.sample_from_uniform(jnp.full(B, 0.5), _logits(5), params))

    @pytest.mark.parametrize("field, value, shown", [
        ("temperature", -2.0,
         r"SamplingParams\.temperature must be a finite number >= 0 .*got -2\.0 at row 3"),
        ("temperature", INF, r"SamplingParams\.temperature .*got inf at row 3"),
        ("top_p", NAN, r"SamplingParams\.top_p must be a number in \[0, 1\] .*got nan at row 3"),
        ("top_p", 1.5, r"SamplingParams\.top_p .*got 1\.5 at row 3 .*; NaN was treated as 1"),
    ])
    def test_reports_the_first_bad_parameter_with_its_row(self, field, value, shown):
        err, outputs = self._run(**{field: jnp.ones(B).at[3].set(value).at[5].set(value)})
        assert err.get() is not None and re.search(shown, err.get())
        assert all(not np.any(np.isnan(np.asarray(out, np.float32))) for out in outputs)

    @pytest.mark.parametrize("row_value, shown", [
        (lambda row: row.at[7].set(NAN), r"logits row 4 .* holds NaN; NaN logits count as -inf"),
        (lambda row: row.at[7].set(INF), r"logits row 4 .* holds \+inf"),
        (lambda row: jnp.full_like(row, -INF), r"logits row 4 .* has no finite logit; it got token 0"),
        (lambda row: jnp.full_like(row, NAN), r"logits row 4 .* holds NaN"),
    ])
    def test_reports_non_finite_logits_with_their_row(self, row_value, shown):
        logits = _logits(5)
        err, (tokens, *_) = self._run(logits=logits.at[4].set(row_value(logits[4])))
        assert re.search(shown, err.get() or "")
        assert 0 <= int(tokens[4]) < V

    def test_reports_uniforms_outside_the_unit_interval(self):
        err, _ = self._run(u=jnp.full(B, 0.5).at[2].set(1.0))
        with pytest.raises(Exception, match=r"u must lie in \[0, 1\), got 1\.0 at row 2"):
            err.throw()


def test_sanitize_params_rule_table():
    t, k, p, m = jax.jit(validation.sanitize_params)(
        jnp.array([-1.0, NAN, INF, 0.5]), jnp.array([-3, 0, 7, 2**31 - 1]),
        jnp.array([-0.5, NAN, 1.5, 0.3]), jnp.array([-1.0, NAN, 2.0, 0.2]))
    assert t.tolist() == [0.0, 0.0, FMAX, 0.5]
    assert k.tolist() == [0, 0, 7, 2**31 - 1]
    assert p.tolist() == [0.0, 1.0, 1.0, pytest.approx(0.3)]
    assert m.tolist() == [0.0, 0.0, 1.0, pytest.approx(0.2)]
