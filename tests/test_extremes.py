"""Hard numerics: extreme temperatures, huge float16/bfloat16 logits, vocabularies from 1 to
1,000,000, and zero-probability tokens that must never be drawn.

The batch shape is the one of tests/test_core.py, so most programs are already compiled.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsample as js
from jsample import draw

B, V = 6, 257


def _logits(seed=0, scale=2.0, shape=(B, V)):
    return np.random.default_rng(seed).normal(0.0, scale, shape).astype(np.float32)


def _keys(seed, n=B):
    return jax.random.split(jax.random.key(seed), n)


def _softmax64(x, temperature):
    z = np.asarray(x, np.float64) / temperature
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _per_row(**fields):
    return js.SamplingParams(**{k: np.asarray(v, np.int32 if k == "top_k" else np.float32)
                                for k, v in fields.items()})


# Each row: a filter, so that the extremes are checked on every path (plain softmax, top-k,
# top-p, min-p, and a top-k larger than the candidate pool).
FILTERS = dict(top_k=[0, 5, 0, 0, 100, 20], top_p=[1.0, 1.0, 0.9, 1.0, 1.0, 0.42],
               min_p=[0.0, 0.0, 0.0, 0.1, 0.0, 0.0])


class TestTemperature:
    def test_tiny_temperature_is_argmax(self):
        logits = _logits(1)
        params = _per_row(temperature=[1e-8] * B, **FILTERS)
        argmax = np.argmax(logits, axis=-1)
        np.testing.assert_array_equal(js.probs(logits, params), np.eye(V)[argmax])
        for seed in range(5):
            tokens, logprobs = js.sample(_keys(seed), logits, params, return_logprobs=True)
            assert np.array_equal(tokens, argmax) and np.all(np.asarray(logprobs) == 0)

    def test_huge_temperature_is_near_uniform(self):
        logits = _logits(2)
        probs = np.asarray(js.probs(logits, _per_row(temperature=[1e6] * B)))
        np.testing.assert_allclose(probs, 1 / V, rtol=1e-4)
        # With filters, uniform over each row's kept set. The huge temperature flattens the
        # distribution, so top-p keeps ceil(p * n) of n tokens and min-p (0.1 of the max) keeps
        # them all. The p values sit well away from a multiple of 1/n.
        filtered = np.asarray(js.probs(logits, _per_row(temperature=[1e6] * B, **FILTERS)))
        for row in range(B):
            kept = filtered[row][filtered[row] > 0]
            np.testing.assert_allclose(kept, 1 / len(kept), rtol=1e-4)
        assert [np.count_nonzero(r) for r in filtered] == [V, 5, int(np.ceil(0.9 * V)), V, 100, 9]
        tokens = np.concatenate([np.asarray(js.sample(_keys(s), logits, _per_row(temperature=[1e6] * B)))
                                 for s in range(8)])
        # 48 uniform draws over 257 tokens hit about 44 distinct ones (sd 2.5); argmax would hit 6.
        assert len(np.unique(tokens)) > 30


class TestLowPrecisionMagnitudes:
    @pytest.mark.parametrize("dtype, big", [(jnp.float16, 6e4), (jnp.bfloat16, 1e38)],
                             ids=["float16", "bfloat16"])
    def test_huge_logits_give_finite_distributions_that_sum_to_one(self, dtype, big):
        rng = np.random.default_rng(3)
        x = rng.uniform(-big, big, (B, V)).astype(np.float32)
        finfo_max = float(jnp.finfo(dtype).max)
        x[0, :4] = [finfo_max, -finfo_max, finfo_max, -finfo_max]  # a tie at the largest value
        x[1, :] = -finfo_max
        x[1, 9] = finfo_max  # the widest spread the dtype can hold
        low = jnp.asarray(x).astype(dtype)
        upcast = np.asarray(low, np.float64)
        # Temperatures on the scale of the logits give non-trivial distributions to compare with.
        for temperature in (big / 10, big / 1000, 1.0):
            params = _per_row(temperature=[temperature] * B)
            probs = np.asarray(js.probs(low, params), np.float64)
            assert np.all(np.isfinite(probs))
            np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
            np.testing.assert_allclose(probs, _softmax64(upcast, temperature), rtol=1e-4, atol=1e-5)
            tokens, logprobs = js.sample(_keys(4), low, params, return_logprobs=True)
            assert np.all(probs[np.arange(B), tokens] > 0) and np.all(np.isfinite(logprobs))
        filtered = np.asarray(js.probs(low, _per_row(temperature=[big / 10] * B, **FILTERS)))
        assert np.all(np.isfinite(filtered))
        np.testing.assert_allclose(filtered.sum(-1), 1.0, rtol=1e-5)


class TestVocabularySizes:
    def test_a_single_token_vocabulary(self):
        x = _logits(5, shape=(B, 1))
        x[3] = -np.inf
        params = _per_row(temperature=[0.0, 1.0, 1e-8, 1e6, 0.7, 1.0], top_k=[0, 5, 1, 0, 0, 3],
                          top_p=[1.0, 0.0, 0.5, 1.0, 0.3, 1.0], min_p=[0.0, 0.0, 1.0, 0.0, 0.5, 0.0])
        tokens, logprobs = js.sample(_keys(0), x, params, return_logprobs=True)
        assert np.asarray(tokens).tolist() == [0] * B
        assert np.asarray(logprobs).tolist() == [0.0, 0.0, 0.0, -np.inf, 0.0, 0.0]
        assert np.asarray(js.probs(x, params))[:, 0].tolist() == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]

    def test_a_million_token_vocabulary(self):
        x = _logits(6, shape=(2, 1_000_000))
        params = _per_row(temperature=[1.0, 0.7], top_p=[1.0, 0.9])
        probs = np.asarray(js.probs(x, params), np.float64)
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-4)
        np.testing.assert_allclose(probs[0], _softmax64(x[0], 1.0), rtol=1e-3, atol=1e-12)
        # Nucleus 0.9 at T=0.7: the kept set is a top slice of the tempered distribution.
        kept = probs[1] > 0
        assert np.min(x[1][kept]) > np.max(x[1][~kept])
        mass = _softmax64(x[1], 0.7)
        assert mass[kept].sum() >= 0.9 - 1e-4 and mass[kept].sum() - mass[kept].min() < 0.9 + 1e-4
        tokens = np.asarray(js.sample(_keys(7, 2), x, params))
        assert np.all(probs[np.arange(2), tokens] > 0)


class TestZeroProbabilityTokens:
    def test_removed_tokens_are_never_drawn_over_many_draws(self):
        # 64 copies of six rows with holes of every kind, drawn in one call (four times): every
        # drawn token must have positive probability under the distribution of its row. The
        # batch shape is the large one of the non-finite and determinism tests.
        base = _logits(8, scale=1.0)
        base[0, ::3] = -np.inf
        base[1, 1::2] = np.nan
        base[2, :200] = -np.inf
        base[3, 100:] = np.nan
        params = _per_row(temperature=[1.0, 0.9, 1.5, 1.0, 2.0, 0.6], top_k=[0, 3, 0, 40, 0, 100],
                          top_p=[0.5, 1.0, 0.8, 1.0, 0.3, 0.99], min_p=[0.0, 0.0, 0.2, 0.05, 0.0, 0.01])
        support = np.asarray(js.probs(base, params)) > 0
        copies = 64
        tiled = jnp.asarray(np.tile(base, (copies, 1)))
        tiled_params = js.SamplingParams(*(np.tile(np.asarray(getattr(params, f)), copies)
                                           for f in ("temperature", "top_k", "top_p", "min_p")))
        tokens = np.concatenate([
            np.asarray(js.sample(_keys(seed, B * copies), tiled, tiled_params)).reshape(copies, B)
            for seed in range(4)])
        assert np.all(support[np.arange(B), tokens])
        # The rows really sample (the check is not vacuous): several tokens per row.
        assert all(len(set(tokens[:, row])) > 1 for row in range(B))

    def test_the_chunked_draw_never_returns_a_zero_weight_token(self):
        # Regression: two chunks of 64 hold mass a (token 0) and 1 (token 65); token 64 is
        # removed. For u * total in [a, before), where before = (a + 1) - 1 rounds above a, the
        # in-chunk target came out negative and the draw returned token 64, of probability 0.
        x, u = [], []
        for L in np.linspace(-3.0, -0.1, 400, dtype=np.float32):
            a = np.float32(jnp.exp(L))
            total = np.float32(a + np.float32(1))
            before = np.float32(total - np.float32(1))
            candidates = [np.float32(a / total)]
            for _ in range(8):
                candidates += [np.nextafter(candidates[-1], np.float32(1))]
            hits = [c for c in candidates if a <= np.float32(c * total) < before]
            if before > a and hits:
                row = np.full(V, -np.inf, np.float32)
                row[0], row[65] = L, 0.0
                x.append(row)
                u.append(hits[0])
            if len(x) == B:
                break
        assert len(x) == B
        tokens, logprobs = js.sample_from_uniform(jnp.asarray(u), jnp.asarray(np.stack(x)),
                                                  return_logprobs=True)
        assert np.asarray(tokens).tolist() == [65] * B
        assert np.all(np.isfinite(logprobs))

    def test_pick_never_returns_a_zero_weight_position(self):
        weights = jnp.array([[0.0, 0.0, 1.0, 0.0, 2.0, 0.0]] * 6)
        targets = jnp.array([-1e-7, np.nan, -np.inf, 0.0, 2.9999, 1e9])
        position, _ = draw.pick(weights, targets)
        assert np.asarray(position).tolist() == [2, 2, 2, 2, 4, 4]
