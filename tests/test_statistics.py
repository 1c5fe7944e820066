"""Sampled frequencies match `probs`: chi-square goodness of fit with fixed seeds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import jsample as js

ROWS, V = 8192, 24
LOGITS = jnp.asarray(np.random.default_rng(11).normal(0.0, 1.5, V), jnp.float32)


@pytest.mark.parametrize("params", [
    js.SamplingParams(),
    js.SamplingParams(temperature=0.7, top_k=10, top_p=0.9),
    js.SamplingParams(temperature=1.3, top_p=0.8, top_p_rule="exclusive", min_p=0.05),
], ids=["softmax", "k-p", "exclusive-minp"])
def test_sampled_frequencies_match_probs(params):
    logits = jnp.broadcast_to(LOGITS, (ROWS, V))
    probs = np.asarray(js.probs(LOGITS, params), np.float64)
    counts = np.zeros(V)
    for seed in range(3):
        tokens = np.asarray(js.sample(jax.random.key(seed), logits, params))
        counts += np.bincount(tokens, minlength=V)
    support = probs > 0
    assert counts[~support].sum() == 0, "a token outside the support was sampled"
    expected = probs[support] / probs[support].sum() * counts.sum()
    result = stats.chisquare(counts[support], expected)
    assert result.pvalue > 1e-3, (counts[support], expected)


def test_per_row_keys_sample_the_same_distribution():
    params = js.SamplingParams(temperature=0.9, top_k=12)
    logits = jnp.broadcast_to(LOGITS, (ROWS, V))
    keys = jax.random.split(jax.random.key(42), ROWS)
    tokens = np.asarray(js.sample(keys, logits, params))
    probs = np.asarray(js.probs(LOGITS, params), np.float64)
    support = probs > 0
    counts = np.bincount(tokens, minlength=V)
    assert counts[~support].sum() == 0
    result = stats.chisquare(counts[support], probs[support] / probs[support].sum() * ROWS)
    assert result.pvalue > 1e-3
