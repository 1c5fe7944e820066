"""jsample samples from exactly the distribution the PyTorch references sample from.

* ``top_p_rule="exclusive"`` against :func:`jsample.reference.seed_probs`, the seed article's
  ``do_sampling`` (its ``top_p=0`` means off, mapped to jsample's ``top_p=1``);
* ``top_p_rule="inclusive"`` against :func:`jsample.reference.inclusive_probs` and the
  transformers warpers (HF convention, ``top_p=1`` off, ``top_p=0`` keeps the top token).

Grids put every parameter combination in one batch with per-row parameters, so each
(vocab, dtype, rule) compiles once. bf16 grids use tie-free logits: ties at a cut-off are where
the positional torch filters and jsample's by-value filters differ on purpose (tested apart).
"""

from __future__ import annotations

import itertools
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

import jsample as js
from jsample.reference import inclusive_probs, inverse_cdf, seed_probs, seed_sample

TOLERANCE = 2e-5
TEMPERATURES = (0.5, 1.0, 1.7)
SEED_TOP_P = (0.0, 0.3, 0.8, 0.95)  # the seed's convention: 0.0 is off
INCLUSIVE_TOP_P = (0.0, 0.3, 0.8, 1.0)  # HF convention: 0.0 keeps the top token, 1.0 is off
MIN_P = (0.0, 0.05)
KINDS = ("flat", "wide", "peaked")
SCALES = {"flat": 0.3, "wide": 3.0, "peaked": 1.0}


def _logits(kinds, vocab: int, dtype: torch.dtype, seed: int, distinct: bool = True) -> torch.Tensor:
    """One row per entry of ``kinds``: flat (small spread), wide, or peaked (three strong tokens).

    With ``distinct`` each row is drawn without replacement from distinct values of ``dtype``
    (rounding 1000 normals to bf16 makes many ties, and even float32 makes some).
    """
    gen = torch.Generator().manual_seed(seed)
    scales = torch.tensor([SCALES[kind] for kind in kinds])[:, None]
    if distinct:
        rows = []
        for scale in scales[:, 0].tolist():
            pool = torch.unique((torch.randn(16 * vocab, generator=gen) * scale).to(dtype))
            rows.append(pool[torch.randperm(len(pool), generator=gen)[:vocab]].float())
        x = torch.stack(rows)
    else:
        x = torch.randn(len(kinds), vocab, generator=gen) * scales
    peaked = torch.tensor([kind == "peaked" for kind in kinds])
    strong = torch.rand(len(kinds), vocab, generator=gen).argsort(dim=1)[:, :3]
    x[peaked] = x[peaked].scatter(1, strong[peaked], torch.tensor([9.0, 7.0, 6.0]).expand(int(peaked.sum()), 3))
    return x.to(dtype)


def _tie_free(x: torch.Tensor) -> torch.Tensor:
    assert all(len(torch.unique(row)) == x.shape[1] for row in x), "grid logits must be tie-free"
    return x


def _exclusive_grid(vocab, dtype):
    combos = list(itertools.product(TEMPERATURES, (0, 1, 7, vocab), SEED_TOP_P, KINDS))
    t, k, p, kinds = zip(*combos)
    x = _tie_free(_logits(kinds, vocab, dtype, seed=vocab))
    return x, torch.tensor(t), torch.tensor(k), torch.tensor(p)


def _inclusive_grid(vocab, dtype):
    combos = list(itertools.product(TEMPERATURES, (0, 1, 7, vocab), INCLUSIVE_TOP_P, MIN_P, KINDS))
    t, k, p, m, kinds = zip(*combos)
    x = _tie_free(_logits(kinds, vocab, dtype, seed=vocab + 1))
    return x, torch.tensor(t), torch.tensor(k), torch.tensor(p), torch.tensor(m)


def _jax(x: torch.Tensor) -> jax.Array:
    dtype = jnp.bfloat16 if x.dtype == torch.bfloat16 else jnp.float32
    return jnp.asarray(x.float().numpy()).astype(dtype)


def _seed_to_jsample_top_p(p: torch.Tensor) -> np.ndarray:
    """The seed treats top_p <= 0 as off; jsample's off value is 1."""
    return np.where(p.numpy() <= 0, 1.0, p.numpy()).astype(np.float32)


def _max_error(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _do_sampling_probs(logits, temperature=1.0, top_k=20, top_p=0.8):
    """The seed article's ``do_sampling`` for one 1-D row, written out as in the article,
    stopping before ``torch.multinomial``."""
    if temperature != 1.0:
        logits = logits / temperature
    probs = F.softmax(logits, dim=-1)
    if top_k != 0:
        top_k_probs, top_k_indices = torch.topk(probs, top_k)
        probs = torch.zeros_like(probs).scatter_(0, top_k_indices, top_k_probs)
        probs = probs / probs.sum()
    if top_p > 0.0:
        sorted_probs, sorted_indices = torch.sort(probs, descending=True)
        cumulative_probs = torch.cumsum(sorted_probs, dim=-1)
        sorted_indices_to_remove = cumulative_probs > top_p
        sorted_indices_to_remove[0] = 0
        indices_to_remove = sorted_indices[sorted_indices_to_remove]
        probs[indices_to_remove] = 0
        probs = probs / probs.sum()
    return probs


# --- The references themselves ---------------------------------------------------------------


def test_seed_probs_is_the_seed_do_sampling_row_by_row():
    x, t, k, p = _exclusive_grid(97, torch.float32)
    batched = seed_probs(x, t, k, p)
    for row in range(x.shape[0]):
        one = _do_sampling_probs(x[row], t[row].item(), k[row].item(), p[row].item())
        assert torch.equal(batched[row], one), row


def test_seed_sample_draws_one_multinomial_per_row():
    x, t, k, p = _exclusive_grid(97, torch.float32)
    gen = torch.Generator().manual_seed(3)
    tokens = seed_sample(x, t, k, p, generator=gen)
    gen.manual_seed(3)
    probs = seed_probs(x, t, k, p)
    expected = torch.stack([torch.multinomial(row, 1, generator=gen)[0] for row in probs])
    assert tokens.dtype == torch.int64 and torch.equal(tokens, expected)


# --- Probabilities: the grid -----------------------------------------------------------------


# bf16 runs on the 1000-token vocabulary only, where rounding makes ties most common.
GRIDS = [(97, torch.float32), (1000, torch.float32), (1000, torch.bfloat16)]
GRID_IDS = ["97-f32", "1000-f32", "1000-bf16"]


@pytest.mark.parametrize("vocab,dtype", GRIDS, ids=GRID_IDS)
def test_exclusive_rule_equals_seed_reference(vocab, dtype):
    x, t, k, p = _exclusive_grid(vocab, dtype)
    params = js.SamplingParams(temperature=t.numpy(), top_k=k.numpy(),
                               top_p=_seed_to_jsample_top_p(p), top_p_rule="exclusive")
    got = js.probs(_jax(x), params)
    assert _max_error(got, seed_probs(x, t, k, p)) <= TOLERANCE


@pytest.mark.parametrize("vocab,dtype", GRIDS, ids=GRID_IDS)
def test_inclusive_rule_equals_inclusive_reference(vocab, dtype):
    x, t, k, p, m = _inclusive_grid(vocab, dtype)
    params = js.SamplingParams(temperature=t.numpy(), top_k=k.numpy(), top_p=p.numpy(),
                               min_p=m.numpy(), top_p_rule="inclusive")
    got = js.probs(_jax(x), params)
    assert _max_error(got, inclusive_probs(x, t, k, p, m)) <= TOLERANCE


def test_the_two_rules_really_differ_on_the_grid():
    """Guards the grid: if both rules gave the same answer, the tests above would prove less."""
    x, t, k, p = _exclusive_grid(97, torch.float32)
    p = _seed_to_jsample_top_p(p)
    exclusive = np.asarray(js.probs(_jax(x), js.SamplingParams(
        temperature=t.numpy(), top_k=k.numpy(), top_p=p, top_p_rule="exclusive")))
    inclusive = inclusive_probs(x, t, k, torch.from_numpy(p)).numpy()
    differs = np.abs(exclusive - inclusive).max(axis=1) > 1e-3
    assert differs.sum() >= 20
    # Where they differ, the inclusive rule keeps more tokens: the one crossing top_p.
    assert np.all((inclusive > 0).sum(1)[differs] > (exclusive > 0).sum(1)[differs])


# --- The seed's quirks, and what each convention does at the edges ---------------------------


def test_seed_top_p_zero_is_off_while_jsample_top_p_zero_keeps_the_top_token():
    x, t, k, _ = _exclusive_grid(97, torch.float32)
    off = seed_probs(x, t, k, 0.0)
    jax_x = _jax(x)
    jsample_off = js.probs(jax_x, js.SamplingParams(temperature=t.numpy(), top_k=k.numpy(),
                                                    top_p=1.0, top_p_rule="exclusive"))
    assert _max_error(jsample_off, off) <= TOLERANCE
    # jsample's top_p=0 is the limit p -> 0 of the seed's rule: only the top token survives.
    top_only = js.probs(jax_x, js.SamplingParams(temperature=t.numpy(), top_k=k.numpy(),
                                                 top_p=0.0, top_p_rule="exclusive"))
    assert _max_error(top_only, seed_probs(x, t, k, 1e-9)) <= TOLERANCE
    assert np.all(np.asarray(top_only).max(axis=1) == 1.0)


def test_seed_top_p_one_can_drop_tokens_that_jsample_keeps():
    """At top_p=1.0 the seed's float32 cumsum of renormalised probabilities can pass 1."""
    x = _logits(("flat",) * len(_exclusive_grid(1000, torch.float32)[1]), 1000, torch.float32, seed=0)
    seed = seed_probs(x, top_k=0, top_p=1.0)
    dropped = (seed == 0).sum(dim=1)
    assert int((dropped > 0).sum()) > 0, "no row hit the rounding quirk"
    kept_by_jsample = np.asarray(js.probs(_jax(x), js.SamplingParams(top_p=1.0,
                                                                     top_p_rule="exclusive")))
    assert np.all(kept_by_jsample > 0)


def test_ties_are_kept_together_by_jsample_and_split_by_the_seed():
    # Rows shaped like the 97-token grid (to reuse its compiled program): a tie at the top-k
    # cut-off, then a three-way tie for the top.
    rows = len(_exclusive_grid(97, torch.float32)[1])
    x = torch.full((rows, 97), -30.0)
    x[0::2, :5] = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0])
    x[1::2, :5] = torch.tensor([1.0, 1.0, 1.0, 0.0, -1.0])
    seed = seed_probs(x, top_k=2, top_p=0.0)
    assert torch.all((seed > 0).sum(1) == 2)
    ours = np.asarray(js.probs(_jax(x), js.SamplingParams(top_k=2, top_p_rule="exclusive")))
    assert np.all((ours > 0).sum(1) == 3)
    np.testing.assert_array_equal(ours[0::2, 2], ours[0::2, 3])
    np.testing.assert_array_equal(ours[1::2, 0], ours[1::2, 2])


# --- Sampling: statistical and exact parity --------------------------------------------------

ROWS_PER_CASE = 4096
VOCAB = 97
# (kind, temperature, top_k, top_p in the seed's convention, min_p for the inclusive rule)
CASES = (
    ("wide", 1.5, 20, 0.8, 0.0),
    ("flat", 1.0, 0, 0.95, 0.0),  # ~90 kept tokens: beyond the candidates, the full-vocabulary path
    ("peaked", 2.5, 7, 0.95, 0.0),
    ("wide", 2.0, VOCAB, 0.7, 0.05),
)


def _reference(rule, x, t, k, p, m):
    if rule == "exclusive":
        return seed_probs(x, t, k, p)
    return inclusive_probs(x, t, k, p, m)


def _params(rule, t, k, p, m):
    if rule == "exclusive":
        return js.SamplingParams(temperature=t.numpy(), top_k=k.numpy(),
                                 top_p=_seed_to_jsample_top_p(p), top_p_rule="exclusive")
    return js.SamplingParams(temperature=t.numpy(), top_k=k.numpy(), top_p=p.numpy(),
                             min_p=m.numpy(), top_p_rule="inclusive")


def _two_sample_chi2(a: np.ndarray, b: np.ndarray, minimum: int = 10) -> float:
    """p-value that two token samples share one distribution; sparse tokens share a bin."""
    counts = np.stack([np.bincount(a, minlength=VOCAB), np.bincount(b, minlength=VOCAB)])
    common = counts.sum(axis=0) >= minimum
    table = np.concatenate([counts[:, common], counts[:, ~common].sum(1, keepdims=True)], axis=1)
    table = table[:, table.sum(axis=0) > 0]
    return stats.chi2_contingency(table).pvalue


@pytest.fixture(scope="module")
def case_rows():
    kinds, t, k, p, m = zip(*CASES)
    x = _logits(kinds, VOCAB, torch.float32, seed=11)
    return x, torch.tensor(t), torch.tensor(k), torch.tensor(p), torch.tensor(m)


@pytest.mark.parametrize("rule", ["exclusive", "inclusive"])
def test_sampled_tokens_match_torch_multinomial_on_the_reference(rule, case_rows):
    x, t, k, p, m = case_rows
    reference = _reference(rule, x, t, k, p, m)
    repeat = lambda v: v.repeat_interleave(ROWS_PER_CASE)
    ours = js.sample(jax.random.key(7), _jax(x).repeat(ROWS_PER_CASE, axis=0),
                     _params(rule, repeat(t), repeat(k), repeat(p), repeat(m)))
    ours = np.array(ours).reshape(len(CASES), ROWS_PER_CASE)
    gen = torch.Generator().manual_seed(7)
    theirs = torch.multinomial(reference, ROWS_PER_CASE, replacement=True, generator=gen).numpy()
    for case in range(len(CASES)):
        assert reference[case, ours[case]].min() > 0, "sampled a token the reference removed"
        assert _two_sample_chi2(ours[case], theirs[case]) > 1e-3, CASES[case]
    # The same test tells the two conventions apart where their distributions differ most.
    other = _reference("inclusive" if rule == "exclusive" else "exclusive", x, t, k, p, m)
    distance = 0.5 * (other - reference).abs().sum(dim=1)
    case = int(distance.argmax())
    assert distance[case] > 0.02
    other_tokens = torch.multinomial(other[case], ROWS_PER_CASE, replacement=True, generator=gen)
    assert _two_sample_chi2(ours[case], other_tokens.numpy()) < 1e-6


@pytest.mark.parametrize("rule", ["exclusive", "inclusive"])
def test_sample_from_uniform_replays_the_torch_inverse_cdf(rule):
    """Thousands of distinct rows, per-row parameters cycling through the grid, shared uniforms."""
    rows = ROWS_PER_CASE * len(CASES)
    x = _logits((KINDS * rows)[:rows], VOCAB, torch.float32, seed=5, distinct=False)
    top_p = SEED_TOP_P if rule == "exclusive" else INCLUSIVE_TOP_P
    combos = list(itertools.product(TEMPERATURES, (0, 1, 7, VOCAB), top_p, MIN_P))
    t, k, p, m = (torch.tensor(v).repeat(rows // len(combos) + 1)[:rows] for v in zip(*combos))
    if rule == "exclusive":
        m = torch.zeros_like(m)
    u = torch.rand(rows, generator=torch.Generator().manual_seed(5))
    ours = np.asarray(js.sample_from_uniform(jnp.asarray(u.numpy()), _jax(x), _params(rule, t, k, p, m)))
    theirs = inverse_cdf(_reference(rule, x, t, k, p, m), u).numpy()
    assert np.mean(ours == theirs) >= 0.999


# --- The seed article's two "optimisations" --------------------------------------------------


def _optimisation_one(logits, temperature, top_k, top_p):
    """Top-p on the renormalised top-k probabilities, already sorted by torch.topk."""
    probs = F.softmax(logits / temperature, dim=-1)
    values, indices = torch.topk(probs, top_k, dim=-1)
    values = values / values.sum(dim=-1, keepdim=True)
    return _exclusive_nucleus_of_sorted(values, indices, logits.shape[-1], top_p)


def _optimisation_two(logits, temperature, top_k, top_p):
    """Top-k on the logits first, then a softmax of only the k values."""
    values, indices = torch.topk(logits / temperature, top_k, dim=-1)
    return _exclusive_nucleus_of_sorted(F.softmax(values, dim=-1), indices, logits.shape[-1], top_p)


def _exclusive_nucleus_of_sorted(values, indices, vocab, top_p):
    remove = torch.cumsum(values, dim=-1) > top_p
    remove[:, 0] = False
    values = values.masked_fill(remove, 0.0)
    values = values / values.sum(dim=-1, keepdim=True)
    return torch.zeros(values.shape[0], vocab).scatter_(-1, indices, values)


@pytest.mark.parametrize("top_k,top_p", [(1, 0.8), (7, 0.5), (50, 0.9), (97, 0.95)])
def test_article_optimisations_equal_the_original_pipeline(top_k, top_p):
    gen = torch.Generator().manual_seed(top_k)
    x = torch.randn(512, VOCAB, generator=gen) * 2
    original = seed_probs(x, 0.7, top_k, top_p)
    for optimised in (_optimisation_one(x, 0.7, top_k, top_p), _optimisation_two(x, 0.7, top_k, top_p)):
        assert torch.equal(optimised > 0, original > 0)
        assert _max_error(optimised, original) <= 1e-6


def test_optimisation_two_changes_nothing_in_exact_arithmetic():
    """The article says softmax-after-top-k "changes the output"; with exact rationals it does not.

    Write ``w_i = exp(logit_i / T)`` as exact positive rationals. The original pipeline
    renormalises ``w_i / W`` over the top k; optimisation 2 takes ``w_i / W_k`` directly.
    """
    rng = np.random.default_rng(0)
    for _ in range(20):
        vocab, top_k = 30, int(rng.integers(1, 30))
        top_p = Fraction(int(rng.integers(1, 100)), 100)
        weights = [Fraction(int(n), int(d)) for n, d in zip(rng.integers(1, 10**6, vocab),
                                                             rng.integers(1, 10**6, vocab))]
        order = sorted(range(vocab), key=lambda i: weights[i], reverse=True)[:top_k]
        total = sum(weights)
        probs = [w / total for w in weights]
        kept_mass = sum(probs[i] for i in order)
        original = [probs[i] / kept_mass for i in order]
        top_k_total = sum(weights[i] for i in order)
        optimised = [weights[i] / top_k_total for i in order]
        assert original == optimised

        def nucleus(sorted_probs):
            cumulative, kept = Fraction(0), []
            for position, q in enumerate(sorted_probs):
                cumulative += q
                kept.append(q if position == 0 or cumulative <= top_p else Fraction(0))
            return [q / sum(kept) for q in kept]

        assert nucleus(original) == nucleus(optimised)


# --- transformers' warpers (inclusive rule) --------------------------------------------------

# Every inclusive grid configuration, HF_ROWS rows each: as many rows as the 97-token inclusive
# grid, so the compiled program is shared.
HF_CONFIGS = list(itertools.product(TEMPERATURES, (0, 1, 7, VOCAB), INCLUSIVE_TOP_P, MIN_P))
HF_ROWS = len(KINDS)


def _hf_probs(x, temperature, top_k, top_p, min_p):
    from transformers import (MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p:
        warpers.append(MinPLogitsWarper(min_p))
    scores = x.clone()
    ids = torch.zeros(x.shape[0], 1, dtype=torch.long)
    for warper in warpers:
        scores = warper(ids, scores)
    return torch.softmax(scores, dim=-1)


def test_inclusive_rule_equals_transformers_warpers():
    pytest.importorskip("transformers")
    configs = HF_CONFIGS
    x = torch.randn(len(configs) * HF_ROWS, VOCAB, generator=torch.Generator().manual_seed(9)) * 2
    x[::3] *= 3  # some peaked rows
    hf = torch.cat([_hf_probs(x[i * HF_ROWS:(i + 1) * HF_ROWS], *c) for i, c in enumerate(configs)])
    t, k, p, m = (torch.tensor(v).repeat_interleave(HF_ROWS) for v in zip(*configs))
    ours = js.probs(_jax(x), js.SamplingParams(temperature=t.numpy(), top_k=k.numpy(),
                                               top_p=p.numpy(), min_p=m.numpy()))
    assert _max_error(ours, hf) <= TOLERANCE
    assert _max_error(inclusive_probs(x, t, k, p, m), hf) <= TOLERANCE
