"""Property-based tests over random logits and parameters (deterministic hypothesis profile)."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import jsample as js

B, V = 4, 33  # fixed shape: every example reuses the same compiled programs

finite = st.floats(-30, 30, allow_nan=False, width=32)
logits_st = st.one_of(
    arrays(np.float32, (B, V), elements=finite),
    arrays(np.float32, (B, V), elements=st.sampled_from([-1.0, 0.0, 1.0, 2.0])),  # many ties
)
params_st = st.builds(
    js.SamplingParams,
    temperature=arrays(np.float32, (B,), elements=st.sampled_from([0.0, 0.05, 0.5, 1.0, 3.0])),
    top_k=arrays(np.int32, (B,), elements=st.integers(0, V + 2)),
    top_p=arrays(np.float32, (B,), elements=st.floats(0, 1, width=32)),
    min_p=arrays(np.float32, (B,), elements=st.floats(0, 1, width=32)),
    top_p_rule=st.sampled_from(["inclusive", "exclusive"]),
)


@given(logits=logits_st, params=params_st, seed=st.integers(0, 2**31 - 1))
def test_tokens_lie_in_the_support_and_probs_are_a_distribution(logits, params, seed):
    probs = np.asarray(js.probs(logits, params))
    assert not np.isnan(probs).any()
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    tokens, logprobs = js.sample(jax.random.key(seed), logits, params, return_logprobs=True)
    tokens = np.asarray(tokens)
    assert ((0 <= tokens) & (tokens < V)).all()
    assert (probs[np.arange(B), tokens] > 0).all()
    np.testing.assert_allclose(np.exp(logprobs), probs[np.arange(B), tokens], rtol=1e-4, atol=1e-6)


@given(logits=logits_st, params=params_st)
def test_kept_sets_are_closed_upwards(logits, params):
    # Every filter keeps all tokens at least as likely as a kept one (ties stay together).
    probs = np.asarray(js.probs(logits, params))
    tempered = np.asarray(logits)
    for b in range(B):
        kept = probs[b] > 0
        if kept.sum() and float(np.asarray(params.temperature)[b]) > 0:
            assert (tempered[b][~kept] < tempered[b][kept].min()).all()
