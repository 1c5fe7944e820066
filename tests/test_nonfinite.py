"""Non-finite logits: NaN counts as -inf, +inf as the largest float32, rows without a finite logit
get token 0 with logprob -inf and all-zero probabilities, and no such row disturbs the others.

One batch shape for every dtype (the one tests/test_core.py uses), so each dtype compiles
``sample`` and ``log_probs`` once.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsample as js

B, V = 6, 257
NAN, INF = float("nan"), float("inf")
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]

# Per-row parameters that send the rows down every path of the sampler: plain softmax (the
# chunked draw), greedy, top-k/top-p/min-p on the candidates, and a top-k too large for them.
MIXED = js.SamplingParams(
    temperature=np.array([1.0, 0.0, 0.7, 1.3, 0.0, 0.9], np.float32),
    top_k=np.array([0, 0, 5, 100, 1, 0], np.int32),
    top_p=np.array([1.0, 1.0, 0.9, 0.95, 1.0, 0.5], np.float32),
    min_p=np.array([0.0, 0.0, 0.0, 0.05, 0.0, 0.1], np.float32),
)
PLAIN = js.SamplingParams(temperature=np.full(B, 0.8, np.float32))
PARAMS = {"mixed": MIXED, "plain": PLAIN}


def _clean(seed, dtype):
    return np.random.default_rng(seed).normal(0.0, 2.0, (B, V)).astype(np.float32).astype(dtype)


def _corrupt(clean, rows):
    """``clean`` with the rows named in ``rows`` (row -> pattern) made non-finite."""
    x = np.array(clean, np.float32)
    for row, pattern in rows.items():
        r = x[row]
        if pattern == "nan_at_max":
            r[[np.argmax(r), 0, V - 1]] = NAN
        elif pattern == "all_nan":
            r[:] = NAN
        elif pattern == "all_neg_inf":
            r[:] = -INF
        elif pattern == "nan_and_neg_inf":
            r[::2], r[1::2] = NAN, -INF
        elif pattern == "pos_inf_pair":
            r[[17, 200]] = INF
        elif pattern == "one_finite":
            r[:] = NAN
            r[123] = 0.5
    return jnp.asarray(x.astype(clean.dtype))


BATCHES = {
    # row -> pattern; the rows not named stay clean.
    "a": {0: "nan_at_max", 2: "all_nan", 4: "all_neg_inf"},
    "b": {1: "pos_inf_pair", 3: "nan_and_neg_inf", 5: "one_finite"},
}
NO_FINITE = {"all_nan", "all_neg_inf", "nan_and_neg_inf"}


def _run(logits, params, seed=0):
    keys = jax.random.split(jax.random.key(seed), B)
    tokens, logprobs = js.sample(keys, logits, params, return_logprobs=True)
    return np.asarray(tokens), np.asarray(logprobs), np.asarray(js.probs(logits, params))


CASES = [(dtype, batch, name) for dtype in DTYPES for batch in BATCHES for name in PARAMS]
IDS = [f"{jnp.dtype(d).name}-{b}-{n}" for d, b, n in CASES]


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def case(request):
    dtype, batch, name = request.param
    clean = _clean(7, dtype)
    bad = _corrupt(clean, BATCHES[batch])
    return dict(rows=BATCHES[batch], params=PARAMS[name], clean=jnp.asarray(clean), bad=bad,
                clean_out=_run(jnp.asarray(clean), PARAMS[name]), bad_out=_run(bad, PARAMS[name]))


def test_rows_without_a_finite_logit_get_token_zero_logprob_neg_inf_and_zero_probs(case):
    tokens, logprobs, probs = case["bad_out"]
    for row, pattern in case["rows"].items():
        if pattern in NO_FINITE:
            assert tokens[row] == 0 and logprobs[row] == -np.inf
            assert np.all(probs[row] == 0)
            assert np.all(np.isneginf(js.log_probs(case["bad"], case["params"])[row]))


def test_other_rows_match_a_clean_run_exactly(case):
    clean_tokens, clean_logprobs, clean_probs = case["clean_out"]
    tokens, logprobs, probs = case["bad_out"]
    others = [row for row in range(B) if row not in case["rows"]]
    assert np.array_equal(tokens[others], clean_tokens[others])
    assert np.array_equal(logprobs[others], clean_logprobs[others])
    assert np.array_equal(probs[others], clean_probs[others])


def test_results_are_valid_and_nan_free(case):
    tokens, logprobs, probs = case["bad_out"]
    assert tokens.dtype == np.int32 and np.all((tokens >= 0) & (tokens < V))
    assert not np.any(np.isnan(logprobs)) and not np.any(np.isnan(probs))
    assert np.all(logprobs <= 0)
    finite_rows = [row for row in range(B) if case["rows"].get(row) not in NO_FINITE]
    np.testing.assert_allclose(probs[finite_rows].sum(-1), 1.0, rtol=1e-5)
    assert np.all(probs[finite_rows, tokens[finite_rows]] > 0)
    assert np.all(np.isfinite(logprobs[finite_rows]))


def test_nan_is_exactly_neg_inf(case):
    as_neg_inf = jnp.where(jnp.isnan(case["bad"]), -jnp.inf, case["bad"])
    for got, expected in zip(case["bad_out"], _run(as_neg_inf, case["params"])):
        assert np.array_equal(got, expected)


def test_pos_inf_entries_tie_at_the_top(case):
    tokens, logprobs, probs = case["bad_out"]
    for row, pattern in case["rows"].items():
        if pattern != "pos_inf_pair":
            continue
        expected = np.zeros(V)
        greedy = float(case["params"].temperature[row]) == 0
        if greedy:  # greedy keeps the first maximum only
            expected[17] = 1.0
        else:
            expected[[17, 200]] = 0.5
        np.testing.assert_allclose(probs[row], expected, rtol=1e-6)
        assert tokens[row] in ((17,) if greedy else (17, 200))
        np.testing.assert_allclose(logprobs[row], 0.0 if greedy else np.log(0.5), rtol=1e-6)


def test_one_finite_logit_among_nans_is_always_drawn(case):
    tokens, logprobs, _ = case["bad_out"]
    for row, pattern in case["rows"].items():
        if pattern == "one_finite":
            assert tokens[row] == 123 and logprobs[row] == 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_nan_and_removed_tokens_are_never_drawn(dtype):
    clean = _clean(11, dtype)
    bad = _corrupt(clean, BATCHES["a"])
    support = np.asarray(js.probs(bad, MIXED)) > 0
    nan = np.isnan(np.asarray(bad, np.float32))
    counts = np.zeros((B, V), np.int64)
    for seed in range(40):
        tokens, _, _ = _run(bad, MIXED, seed)
        counts[np.arange(B), tokens] += 1
    finite_rows = [0, 1, 3, 5]
    assert not np.any(counts[finite_rows] & nan[finite_rows])
    assert np.all(support[finite_rows] | (counts[finite_rows] == 0))
    # The sampling rows, the NaN row among them, really explored their support.
    assert len(np.flatnonzero(counts[0])) > 5 and len(np.flatnonzero(counts[3])) > 5


@pytest.mark.parametrize("batch", BATCHES)
def test_a_large_batch_gives_each_row_the_result_of_a_small_one(batch):
    # Regression: above a few dozen rows XLA:CPU reduces with a vectorised max that drops NaN
    # (and can return a wrong chunk maximum), so a NaN-only check on the maxima missed NaN rows,
    # which then drew NaN tokens with NaN logprobs. 64 copies of the batch, each row with its
    # key, must reproduce the 6-row results exactly.
    copies = 64
    bad = _corrupt(_clean(7, jnp.float32), BATCHES[batch])
    keys = jax.random.split(jax.random.key(0), B)
    small_tokens, small_logprobs = js.sample(keys, bad, MIXED, return_logprobs=True)
    tile = lambda a: np.tile(np.asarray(a), copies)
    params = js.SamplingParams(*(tile(getattr(MIXED, f)) for f in ("temperature", "top_k", "top_p", "min_p")))
    big = jnp.asarray(np.tile(np.asarray(bad), (copies, 1)))
    tokens, logprobs = js.sample(jnp.tile(keys, copies), big, params, return_logprobs=True)
    assert np.array_equal(np.asarray(tokens).reshape(copies, B), np.tile(small_tokens, (copies, 1)))
    assert np.array_equal(np.asarray(logprobs).reshape(copies, B), np.tile(small_logprobs, (copies, 1)))
    probs = np.asarray(js.probs(big, params)).reshape(copies, B, V)
    assert np.array_equal(probs, np.broadcast_to(np.asarray(js.probs(bad, MIXED)), probs.shape))


# The fast sampler (a vocabulary that 64 divides) runs on the raw logits and must treat NaN exactly
# as -inf. On float32 it finds NaN in its strided chunk maxima (selection.nan_probe; the float32
# cases fail without it). On bfloat16 its chunk maxima are a max reduction, and it also sums the
# logits (or reads the sums of its exp pass); XLA:CPU's bfloat16 max propagates NaN today, so
# these cases pass with either check alone. All parameter sets share one compiled program per dtype.
# 6 x 1024 float32 logits are enough for XLA:CPU's vectorised max, which returns a chunk maximum
# below the true one when the chunk's last entry is NaN; XLA:GPU's returns NaN. The test checks
# that a plain chunk maximum is still wrong one way or the other.
FAST_V = 1024
FAST_PARAMS = {
    "top-p only": dict(temperature=1.0, top_p=0.9),
    "no filter": dict(temperature=0.8),
    "top-k": dict(temperature=0.7, top_k=20),
    "greedy": dict(temperature=0.0),
    "mixed": dict(temperature=[1.0, 0.0, 0.7, 1.3, 1.0, 0.9], top_k=[0, 0, 5, 100, 0, 0],
                  top_p=[0.9, 1.0, 1.0, 0.95, 1.0, 1.0], min_p=[0.0, 0.0, 0.0, 0.05, 0.0, 0.1]),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", FAST_PARAMS)
def test_fast_path_treats_nan_as_neg_inf(name, dtype):
    rng = np.random.default_rng(11)
    clean = rng.normal(0.0, 2.0, (B, FAST_V)).astype(np.float32).astype(dtype).astype(np.float32)
    bad = clean.copy()
    bad[1, 63::64] = NAN
    bad[4, 600:] = NAN
    bad[4, 63::64] = NAN
    as_neg_inf = np.where(np.isnan(bad), -INF, bad)
    chunk_max = jax.jit(lambda x: x.reshape(B, -1, 64).max(-1))(jnp.asarray(bad))
    true_max = as_neg_inf.reshape(B, -1, 64).max(-1)
    assert not np.array_equal(np.asarray(chunk_max), true_max), "no wrong maximum"
    params = js.SamplingParams(**{f: np.broadcast_to(np.asarray(v, np.float32 if f != "top_k" else np.int32), (B,))
                                  for f, v in FAST_PARAMS[name].items()})
    keys = jax.random.split(jax.random.key(5), B)
    sample = jax.jit(lambda k, x, p: js.sample(k, x, p, return_logprobs=True))
    got = sample(keys, jnp.asarray(bad, dtype), params)
    want = sample(keys, jnp.asarray(as_neg_inf, dtype), params)
    assert np.array_equal(np.asarray(got[0]), np.asarray(want[0]))
    assert np.array_equal(np.asarray(got[1]), np.asarray(want[1]))
    assert not np.isnan(np.asarray(got[1])).any()
    # The NaN rows really changed the outcome's inputs (not a vacuous comparison with clean).
    assert not np.isnan(bad[1][np.asarray(got[0])[1]])
