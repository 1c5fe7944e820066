"""Determinism: the same key gives the same tokens across runs, with and without an outer jit,
across batch sizes and orders (per-row keys) and across vocabulary padding with -inf columns.

Per-row parameters send the rows down every path of the sampler at once: plain softmax (the
chunked whole-vocabulary draw), greedy, the candidate tier (top-k, top-p, min-p) and the exact
bisection tier (a top-k larger than the candidate pool, a nucleus wider than it).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsample as js

B, V = 6, 257
SEEDS = range(12)

PARAMS = js.SamplingParams(
    temperature=np.array([1.0, 0.0, 0.7, 1.0, 1.3, 0.9], np.float32),
    top_k=np.array([0, 0, 40, 150, 0, 0], np.int32),
    top_p=np.array([1.0, 1.0, 0.9, 1.0, 0.999, 1.0], np.float32),
    min_p=np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.02], np.float32),
)
FIELDS = ("temperature", "top_k", "top_p", "min_p")


def _logits(seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(0.0, 1.5, (B, V)), jnp.float32)


def _keys(seed):
    return jax.random.split(jax.random.key(seed), B)


def _rows(params, index):
    return js.SamplingParams(*(np.asarray(getattr(params, f))[index] for f in FIELDS))


def _draw(keys, logits, params=PARAMS):
    tokens, logprobs = js.sample(keys, logits, params, return_logprobs=True)
    return np.asarray(tokens), np.asarray(logprobs)


@pytest.fixture(scope="module")
def reference():
    """Tokens and logprobs ``[seeds, B]`` of the plain eager call, the baseline of every test."""
    logits = _logits()
    draws = [_draw(_keys(seed), logits) for seed in SEEDS]
    return logits, np.stack([t for t, _ in draws]), np.stack([lp for _, lp in draws])


def test_the_reference_draws_are_not_degenerate(reference):
    _, tokens, _ = reference
    # Greedy row 1 repeats its token; the sampled rows must not.
    assert len(set(tokens[:, 1])) == 1
    assert all(len(set(tokens[:, row])) > 3 for row in (0, 2, 3, 4, 5))


def test_repeated_runs_are_bitwise_identical(reference):
    logits, tokens, logprobs = reference
    for i, seed in enumerate(SEEDS[:4]):
        again, again_lp = _draw(_keys(seed), logits)
        assert np.array_equal(again, tokens[i]) and np.array_equal(again_lp, logprobs[i])


def test_an_outer_jit_gives_the_same_tokens(reference):
    logits, tokens, logprobs = reference
    step = jax.jit(lambda keys, x, params: js.sample(keys, x, params, return_logprobs=True))
    for i, seed in enumerate(SEEDS):
        jitted, jitted_lp = step(_keys(seed), logits, PARAMS)
        assert np.array_equal(jitted, tokens[i])
        np.testing.assert_allclose(jitted_lp, logprobs[i], rtol=1e-6)


def test_one_key_for_the_batch_is_deterministic_too():
    logits = _logits(1)
    key = jax.random.key(42)
    first = np.asarray(js.sample(key, logits, PARAMS))
    assert np.array_equal(first, js.sample(key, logits, PARAMS))
    assert not np.array_equal(first, js.sample(jax.random.key(43), logits, PARAMS))


def test_batch_order_does_not_matter(reference):
    logits, tokens, logprobs = reference
    for i, seed in enumerate(SEEDS[:6]):
        perm = np.random.default_rng(seed).permutation(B)
        shuffled, shuffled_lp = _draw(_keys(seed)[perm], logits[perm], _rows(PARAMS, perm))
        assert np.array_equal(shuffled, tokens[i][perm])
        assert np.array_equal(shuffled_lp, logprobs[i][perm])


def test_each_row_alone_gives_its_batch_result(reference):
    logits, tokens, logprobs = reference
    for i, seed in enumerate(SEEDS[:2]):
        keys = _keys(seed)
        for row in range(B):
            token, logprob = js.sample(keys[row], logits[row], _rows(PARAMS, row), return_logprobs=True)
            assert int(token) == tokens[i, row]
            np.testing.assert_allclose(logprob, logprobs[i, row], rtol=1e-6)


def test_a_large_batch_gives_each_row_its_small_batch_result(reference):
    # 64 copies: a batch large enough for XLA:CPU's vectorised reductions (another emitter).
    logits, tokens, logprobs = reference
    copies = 64
    big = jnp.asarray(np.tile(np.asarray(logits), (copies, 1)))
    params = js.SamplingParams(*(np.tile(np.asarray(getattr(PARAMS, f)), copies) for f in FIELDS))
    for i, seed in enumerate(SEEDS[:3]):
        big_tokens, big_logprobs = _draw(jnp.tile(_keys(seed), copies), big, params)
        assert np.array_equal(big_tokens.reshape(copies, B), np.tile(tokens[i], (copies, 1)))
        np.testing.assert_allclose(big_logprobs.reshape(copies, B), np.tile(logprobs[i], (copies, 1)),
                                   rtol=1e-6)


@pytest.mark.parametrize("padded_vocab", [300, 288], ids=["same-chunking", "other-chunking"])
def test_padding_the_vocabulary_with_neg_inf_changes_nothing(reference, padded_vocab):
    # 257 and 300 tokens are both laid out as 5 chunks of 64 (padded inside with -inf), so the
    # computation is the same; 288 is read in chunks of 32, the whole-vocabulary sums run in
    # another order, and logprobs may differ by rounding.
    logits, tokens, logprobs = reference
    padded = jnp.pad(logits, ((0, 0), (0, padded_vocab - V)), constant_values=-jnp.inf)
    for i, seed in enumerate(SEEDS):
        padded_tokens, padded_lp = _draw(_keys(seed), padded)
        assert np.array_equal(padded_tokens, tokens[i])
        if padded_vocab == 300:
            assert np.array_equal(padded_lp, logprobs[i])
        else:
            np.testing.assert_allclose(padded_lp, logprobs[i], rtol=1e-6)
    if padded_vocab == 288:
        probs = np.asarray(js.probs(padded, PARAMS))
        assert np.all(probs[:, V:] == 0)
        np.testing.assert_allclose(probs[:, :V], js.probs(logits, PARAMS), rtol=1e-6, atol=1e-9)
