"""The core contract of jsample: rules, greedy rows, keys, batching and transformations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsample as js
from jsample import selection

B, V = 6, 257  # one shape shared by most tests, so each program compiles once


def _logits(seed=0, scale=2.0, shape=(B, V)):
    return jnp.asarray(np.random.default_rng(seed).normal(0.0, scale, shape), jnp.float32)


HALVES = jnp.log(jnp.array([0.5, 0.25, 0.125, 0.125]))


def kept(p):
    return np.asarray(p > 0).tolist()


class TestRules:
    def test_top_p_rules_on_the_seed_example(self):
        inclusive = js.probs(HALVES, js.SamplingParams(top_p=0.6))
        exclusive = js.probs(HALVES, js.SamplingParams(top_p=0.6, top_p_rule="exclusive"))
        assert kept(inclusive) == [True, True, False, False]
        assert kept(exclusive) == [True, False, False, False]
        np.testing.assert_allclose(inclusive, [2 / 3, 1 / 3, 0, 0], rtol=1e-6)

    def test_cumulative_mass_exactly_p(self):
        # Mass .75 after two tokens: inclusive stops there, exclusive keeps it (<= p).
        p = js.SamplingParams(top_p=0.75)
        assert kept(js.probs(HALVES, p)) == [True, True, False, False]
        assert kept(js.probs(HALVES, p.replace(top_p_rule="exclusive"))) == [True, True, False, False]

    @pytest.mark.parametrize("rule", ["inclusive", "exclusive"])
    def test_top_p_zero_keeps_the_top_token(self, rule):
        assert kept(js.probs(HALVES, js.SamplingParams(top_p=0.0, top_p_rule=rule))) == [
            True, False, False, False]

    def test_ties_at_a_cutoff_are_kept_together(self):
        # top-k 3 meets a tie at .125: both tied tokens stay (by value, order-independent).
        assert kept(js.probs(HALVES, js.SamplingParams(top_k=3))) == [True] * 4
        # exclusive top-p 0.8: the tie group's mass would reach 1.0 > .8, so it goes together.
        excl = js.probs(HALVES, js.SamplingParams(top_p=0.8, top_p_rule="exclusive"))
        assert kept(excl) == [True, True, False, False]
        # inclusive top-p 0.8: the mass above the tie is .75 < .8, so the whole group stays.
        assert kept(js.probs(HALVES, js.SamplingParams(top_p=0.8))) == [True] * 4

    def test_top_k(self):
        logits = jnp.array([1.0, 4.0, 2.0, 3.0])
        assert kept(js.probs(logits, js.SamplingParams(top_k=2))) == [False, True, False, True]
        assert kept(js.probs(logits, js.SamplingParams(top_k=4))) == [True] * 4

    def test_min_p_compares_probabilities(self):
        probs = jnp.array([0.6, 0.3, 0.1])
        out = js.probs(jnp.log(probs), js.SamplingParams(min_p=0.25))
        np.testing.assert_allclose(out, [2 / 3, 1 / 3, 0], rtol=1e-6)
        # Negative logits: the rule is on probabilities, so shifting the logits changes nothing.
        shifted = js.probs(jnp.log(probs) - 50.0, js.SamplingParams(min_p=0.25))
        np.testing.assert_allclose(shifted, out, rtol=1e-5)

    def test_top_p_sees_the_tempered_top_k_distribution(self):
        logits = jnp.log(jnp.array([0.4, 0.3, 0.2, 0.1]))
        # After top-k 2 the distribution is [4/7, 3/7]: top-p 0.5 then keeps one token.
        assert kept(js.probs(logits, js.SamplingParams(top_k=2, top_p=0.5))) == [True, False, False, False]
        # Temperature 5 flattens [.4,.3,.2,.1] so that the top two hold < .6: a third is needed.
        hot = js.probs(logits, js.SamplingParams(temperature=5.0, top_p=0.6))
        assert kept(hot) == [True, True, True, False]
        assert kept(js.probs(logits, js.SamplingParams(top_p=0.6))) == [True, True, False, False]

    def test_off_values_give_softmax(self):
        logits = _logits()
        off = js.SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
        np.testing.assert_allclose(js.probs(logits, off), jax.nn.softmax(logits), atol=1e-6)
        np.testing.assert_allclose(js.probs(logits, off.replace(top_k=V)), jax.nn.softmax(logits), atol=1e-6)

    def test_temperature_divides(self):
        logits = _logits()
        np.testing.assert_allclose(
            js.probs(logits, js.SamplingParams(temperature=0.5)), jax.nn.softmax(logits / 0.5), atol=1e-6)

    def test_log_probs_is_the_log_of_probs(self):
        logits = _logits()
        params = js.SamplingParams(temperature=0.8, top_k=40, top_p=0.9)
        lp = js.log_probs(logits, params)
        p = js.probs(logits, params)
        assert bool(jnp.all(jnp.isneginf(lp) == (p == 0)))
        np.testing.assert_allclose(jnp.exp(lp), p, atol=1e-7)


class TestGreedy:
    def test_temperature_zero_is_argmax_with_lowest_index_on_ties(self):
        logits = jnp.array([[0.0, 3.0, 3.0, 1.0], [5.0, 5.0, 0.0, 5.0]])
        tokens = js.sample(jax.random.key(0), logits, js.SamplingParams(temperature=0.0))
        assert tokens.tolist() == [1, 0]
        assert js.probs(logits, js.SamplingParams(temperature=0.0)).tolist() == [
            [0, 1, 0, 0], [1, 0, 0, 0]]

    def test_greedy_rows_stay_greedy_in_mixed_batches(self):
        logits = _logits(scale=0.5)  # flat: a sampled row would rarely hit the argmax
        temperature = jnp.array([0.0, 1.0, 0.0, 2.0, 0.0, 1.0])
        params = js.SamplingParams(temperature=temperature, top_p=0.95)
        argmax = jnp.argmax(logits, axis=-1)
        greedy = np.asarray(temperature == 0)
        hits = np.zeros(B, int)
        for seed in range(20):
            tokens = js.sample(jax.random.key(seed), logits, params)
            assert np.array_equal(np.asarray(tokens)[greedy], np.asarray(argmax)[greedy])
            hits += np.asarray(tokens == argmax)
        assert np.all(hits[~greedy] < 20)  # the sampling rows really sampled

    def test_greedy_logprob_is_zero(self):
        tokens, logprobs = js.sample(jax.random.key(0), _logits(), js.SamplingParams(temperature=0.0),
                                     return_logprobs=True)
        assert np.all(np.asarray(logprobs) == 0.0)


class TestGreedyTies:
    """Greedy rows over a float32 vocabulary that 64 divides take the whole-batch path. Its
    chunks are strided (selection.make_strided_layout): at V = 1024, chunk c holds the tokens
    c + 64 i, and groups of 16 chunks make 4 groups. Its argmax reads the chunks of the first group
    holding the maximum; ties must still give the first maximum, however they interleave."""

    SHAPE = (6, 1024)  # as in test_nonfinite

    def _tied(self):
        x = np.random.default_rng(3).normal(0.0, 1.0, self.SHAPE).astype(np.float32)
        x[1, [5 + 64 * 9, 5 + 64 * 3]] = 9.0  # two chunks, same offset: 197
        x[2, [1 + 64 * 10, 2 + 64 * 2]] = 9.0  # the earlier chunk holds the later offset: 130
        x[3, [1 + 64 * 8, 5 + 64 * 1, 3 + 64 * 1]] = 9.0  # two in one chunk: 67
        x[4] = 0.5  # all equal: token 0
        x[5] = -np.inf  # no finite logit: token 0, logprob -inf
        return x

    def test_first_maximum_with_ties(self):
        x = self._tied()
        greedy = js.SamplingParams(temperature=0.0)
        tokens, logprobs = jax.jit(lambda k, x: js.sample(k, x, greedy, return_logprobs=True))(
            jax.random.key(0), jnp.asarray(x))
        assert tokens.tolist() == np.argmax(x, axis=-1).tolist() == [int(np.argmax(x[0])), 197, 130, 67, 0, 0]
        assert logprobs.tolist() == [0.0] * 5 + [-np.inf]
        u = jnp.full((self.SHAPE[0],), 0.5)
        assert js.sample_from_uniform(u, jnp.asarray(x), greedy).tolist() == tokens.tolist()

    def test_ties_in_more_groups_than_it_reads(self):
        x = np.random.default_rng(4).normal(0.0, 1.0, self.SHAPE).astype(np.float32)
        # Chunks 20, 40 and 50 (groups 1, 2, 3) at positions 7, 5 and 2: the first maximum (178)
        # is in the third group holding it, past the one the argmax reads: a scan finds it.
        x[0, [20 + 64 * 7, 40 + 64 * 5, 50 + 64 * 2]] = 9.0
        # The same groups, the first maximum at position 0 of the first group: 3, read directly.
        x[1, [3, 20 + 64 * 5, 50 + 64 * 1]] = 9.0
        # Every group, one of them twice: 64 * 3 + 17 = 209.
        x[2, [64 * 9 + 1, 64 * 3 + 17, 64 * 4 + 2, 64 * 6 + 33, 64 * 8 + 60]] = 9.0
        greedy = js.SamplingParams(temperature=0.0)
        tokens = js.sample(jax.random.key(0), jnp.asarray(x), greedy)
        assert tokens.tolist()[:3] == [178, 3, 209]
        assert tokens.tolist() == np.argmax(x, axis=-1).tolist()

    def test_nan_and_inf(self):
        x = self._tied()
        top = int(np.argmax(x[0]))
        x[0, top] = np.nan  # the row's maximum is NaN: it counts as -inf
        x[1, [700, 300]] = np.inf  # +inf twice: the first one
        want = np.argmax(np.where(np.isnan(x), -np.inf, x), axis=-1)
        assert want[0] != top and want[1] == 300
        tokens, logprobs = js.sample(jax.random.key(0), jnp.asarray(x), js.SamplingParams(temperature=0.0),
                                     return_logprobs=True)
        assert tokens.tolist() == want.tolist()
        assert logprobs.tolist() == [0.0] * 5 + [-np.inf]


class TestKeysAndBatches:
    params = js.SamplingParams(temperature=0.9, top_k=50, top_p=0.9)

    def test_same_key_same_tokens(self):
        logits = _logits()
        a = js.sample(jax.random.key(3), logits, self.params)
        b = js.sample(jax.random.key(3), logits, self.params)
        c = js.sample(jax.random.key(4), logits, self.params)
        assert np.array_equal(a, b)
        assert not np.array_equal(a, c)

    def test_legacy_prngkey_is_accepted(self):
        logits = _logits()
        legacy = js.sample(jax.random.PRNGKey(3), logits, self.params)
        typed = js.sample(jax.random.wrap_key_data(jax.random.PRNGKey(3)), logits, self.params)
        assert np.array_equal(legacy, typed)

    def test_a_batch_equals_its_rows_one_by_one(self):
        logits = _logits()
        keys = jax.random.split(jax.random.key(5), B)
        temperature = jnp.linspace(0.3, 1.5, B)
        top_k = jnp.array([0, 1, 5, 50, 0, 300])
        params = js.SamplingParams(temperature=temperature, top_k=top_k, top_p=0.9)
        batch = js.sample(keys, logits, params)
        for b in range(B):
            row = js.SamplingParams(temperature=temperature[b], top_k=top_k[b], top_p=0.9)
            assert int(js.sample(keys[b], logits[b], row)) == int(batch[b])
            np.testing.assert_allclose(js.probs(logits[b], row), js.probs(logits, params)[b], atol=1e-7)

    def test_row_independence_under_batch_shuffling(self):
        logits = _logits(scale=0.7)
        keys = jax.random.split(jax.random.key(6), B)
        perm = np.random.default_rng(0).permutation(B)
        temperature = jnp.linspace(0.5, 1.5, B)
        base = js.sample(keys, logits, js.SamplingParams(temperature=temperature, top_p=0.97))
        shuffled = js.sample(keys[perm], logits[perm],
                             js.SamplingParams(temperature=temperature[perm], top_p=0.97))
        assert np.array_equal(np.asarray(base)[perm], shuffled)

    def test_one_key_gives_rows_different_streams(self):
        logits = jnp.zeros((64, 16))  # uniform rows: identical streams would give identical tokens
        tokens = js.sample(jax.random.key(0), logits)
        assert len(set(np.asarray(tokens).tolist())) > 4

    def test_shapes(self):
        logits = _logits(shape=(2, 3, V))
        tokens, logprobs = js.sample(jax.random.key(0), logits, self.params, return_logprobs=True)
        assert tokens.shape == (2, 3) and tokens.dtype == jnp.int32
        assert logprobs.shape == (2, 3) and logprobs.dtype == jnp.float32
        assert js.probs(logits, self.params).shape == (2, 3, V)
        scalar = js.sample(jax.random.key(0), logits[0, 0], self.params)
        assert scalar.shape == ()

    def test_logprobs_match_log_probs(self):
        logits = _logits()
        tokens, logprobs = js.sample(jax.random.key(1), logits, self.params, return_logprobs=True)
        table = js.log_probs(logits, self.params)
        np.testing.assert_allclose(logprobs, table[jnp.arange(B), tokens], atol=1e-5)

    def test_sample_is_the_inverse_cdf_of_its_uniforms(self):
        logits = _logits()
        u = jax.random.uniform(jax.random.key(7), (B,))
        tokens = js.sample(jax.random.key(7), logits, self.params)
        assert np.array_equal(tokens, js.sample_from_uniform(u, logits, self.params))
        cdf = np.cumsum(np.asarray(js.probs(logits, self.params), np.float64), axis=-1)
        expected = [int(np.searchsorted(cdf[b], u[b], side="right")) for b in range(B)]
        assert np.asarray(tokens).tolist() == expected


class TestTransformations:
    params = js.SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.01)

    def test_jit_matches_eager_and_never_retraces_on_new_values(self):
        traces = []

        @jax.jit
        def step(key, logits, params):
            traces.append(1)
            return js.sample(key, logits, params)

        logits = _logits()
        eager = js.sample(jax.random.key(0), logits, self.params)
        assert np.array_equal(step(jax.random.key(0), logits, self.params), eager)
        for t, k, p, m in [(0.0, 0, 1.0, 0.0), (1, 5, 0.5, 0.1), (2.5, 256, 0.0, 1.0)]:
            step(jax.random.key(1), logits, js.SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m))
        assert len(traces) == 1
        # Per-row arrays are a different pytree shape (one trace), then values change freely.
        for shift in range(3):
            step(jax.random.key(2), logits, js.SamplingParams(
                temperature=jnp.linspace(0, 2, B) + shift, top_k=jnp.arange(B) * shift,
                top_p=jnp.linspace(0, 1, B) ** (shift + 1), min_p=jnp.zeros(B) + 0.1 * shift))
        assert len(traces) == 2

    def test_vmap(self):
        logits = _logits()
        keys = jax.random.split(jax.random.key(0), B)
        mapped = jax.vmap(lambda k, x: js.sample(k, x, self.params))(keys, logits)
        assert np.array_equal(mapped, js.sample(keys, logits, self.params))

    def test_scan(self):
        logits = _logits()

        def body(carry, key):
            token = js.sample(key, logits + carry, self.params)
            return carry, token

        keys = jax.random.split(jax.random.key(0), 4)
        _, tokens = jax.lax.scan(body, jnp.zeros((B, V)), keys)
        assert tokens.shape == (4, B)
        for i in range(4):
            assert np.array_equal(tokens[i], js.sample(keys[i], logits, self.params))

    def test_bf16_logits_are_upcast(self):
        low = _logits().astype(jnp.bfloat16)
        np.testing.assert_allclose(js.probs(low, self.params), js.probs(low.astype(jnp.float32), self.params),
                                   atol=1e-7)
        tokens = js.sample(jax.random.key(0), low, self.params)
        assert np.array_equal(tokens, js.sample(jax.random.key(0), low.astype(jnp.float32), self.params))


class TestBfloat16RowBlocks:
    """bfloat16 logits cross the row-block loops as integer bits and are converted block by
    block (jsample.selection.map_row_blocks); a small block size sends these through several."""

    SHAPE = (6, 448)  # a shape no other test compiles: the patched block size applies

    def test_blocks_arrive_as_float32(self, monkeypatch):
        monkeypatch.setattr(selection, "BLOCK_BYTES", 2 * 4 * 448)
        x = _logits(5, shape=self.SHAPE).astype(jnp.bfloat16)
        out = jax.jit(lambda x: selection.map_row_blocks(
            lambda xb: (xb, jnp.full(xb.shape[:1], xb.dtype == jnp.float32)), x))(x)
        assert selection.block_rows(*self.SHAPE) == 2  # three blocks
        assert out[0].dtype == jnp.float32 and bool(jnp.all(out[1]))
        assert np.array_equal(out[0], x.astype(jnp.float32))

    @pytest.mark.parametrize("nan", [False, True], ids=["clean", "nan row"])
    def test_tokens_and_probs_match_float32(self, monkeypatch, nan):
        # Without NaN the exp passes run in row blocks; a NaN row sends the whole batch down the
        # sanitising path, also in row blocks.
        monkeypatch.setattr(selection, "BLOCK_BYTES", 2 * 4 * 448)
        x = _logits(6, scale=3.0, shape=self.SHAPE).astype(jnp.bfloat16)
        if nan:
            x = x.at[1, 7].set(jnp.nan)
        key = jax.random.key(2)
        for params in (js.SamplingParams(temperature=0.8), js.SamplingParams(top_p=0.9),
                       js.SamplingParams(top_k=5, min_p=0.1, temperature=1.3)):
            low = js.sample(key, x, params, return_logprobs=True)
            high = js.sample(key, x.astype(jnp.float32), params, return_logprobs=True)
            assert np.array_equal(low[0], high[0]) and np.array_equal(low[1], high[1])
            assert np.array_equal(js.probs(x, params), js.probs(x.astype(jnp.float32), params))


class TestProcessors:
    def test_processors_compose_into_the_default_order(self):
        logits = _logits()
        params = js.SamplingParams(temperature=0.7, top_k=30, top_p=0.8, min_p=0.02)
        chained = js.mask_min_p(js.mask_top_p(js.mask_top_k(js.apply_temperature(logits, 0.7), 30), 0.8), 0.02)
        np.testing.assert_allclose(js.probs(chained), js.probs(logits, params), atol=1e-6)
        key = jax.random.key(0)
        assert np.array_equal(js.sample(key, chained), js.sample(key, logits, params))

    def test_labml_order_top_p_before_temperature(self):
        logits = jnp.log(jnp.array([0.4, 0.3, 0.2, 0.1]))
        labml = js.apply_temperature(js.mask_top_p(logits, 0.6), 5.0)
        # top-p on the untempered distribution keeps two tokens; the default order keeps three.
        assert kept(js.probs(labml)) == [True, True, False, False]
        assert kept(js.probs(logits, js.SamplingParams(temperature=5.0, top_p=0.6))) == [True, True, True, False]

    def test_processor_outputs(self):
        logits = jnp.array([[1.0, 4.0, 2.0, 3.0], [3.0, 1.0, 2.0, 0.0]])
        assert js.mask_top_k(logits, jnp.array([1, 3])).tolist() == [
            [-jnp.inf, 4.0, -jnp.inf, -jnp.inf], [3.0, 1.0, 2.0, -jnp.inf]]
        np.testing.assert_allclose(js.apply_temperature(logits, 2.0), logits / 2.0)
        assert js.apply_temperature(logits, 0.0).tolist() == [
            [-jnp.inf, 4.0, -jnp.inf, -jnp.inf], [3.0, -jnp.inf, -jnp.inf, -jnp.inf]]


class TestErrors:
    @pytest.mark.parametrize("field, value", [
        ("temperature", -1.0), ("temperature", float("nan")), ("top_p", 1.5), ("top_k", -3),
        ("min_p", -0.1), ("min_p", 2.0)])
    def test_bad_values_name_the_argument(self, field, value):
        with pytest.raises(ValueError, match=field):
            js.SamplingParams(**{field: value})

    def test_unknown_rule(self):
        with pytest.raises(ValueError, match="top_p_rule"):
            js.SamplingParams(top_p_rule="nucleus")

    def test_bad_logits(self):
        with pytest.raises(TypeError, match="floating"):
            js.sample(jax.random.key(0), jnp.arange(4), js.SamplingParams())
        with pytest.raises(ValueError, match="empty vocabulary"):
            js.probs(jnp.zeros((2, 0)), js.SamplingParams())

    def test_bad_keys(self):
        with pytest.raises(TypeError, match="key"):
            js.sample(0, _logits(), js.SamplingParams())
        with pytest.raises(ValueError, match="batch shape"):
            js.sample(jax.random.split(jax.random.key(0), 3), _logits(), js.SamplingParams())

    def test_parameter_shape_mismatch(self):
        with pytest.raises(ValueError, match="temperature"):
            js.sample(jax.random.key(0), _logits(), js.SamplingParams(temperature=jnp.ones(B + 1)))
