"""The fast paths equal the definitions: every tier of the cutoff, against a float64 NumPy reference.

The sampler answers each row from the first tier that can prove its kept set (see
jsample/cutoff.py): the threshold candidates, the same with 4, 16 and 32 times the slots, and
an exact bisection over the vocabulary. Whatever the tier, the kept set, the probabilities and
the inverse-CDF draw must be those of the rules written out naively below. Per-row parameters
mix every filter in one batch; the logits include ties, clustered (sorted) rows and masked
tokens. ``candidates`` 4 pushes many rows past the first tiers; a batch of narrow filters with
64 candidates stays in the first. The test checks that each tier really answered some rows.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsample as js
from jsample import cutoff, sampling, selection

N, V = 12, 512  # V divides into chunks of 64: the unpadded whole-batch path

# One row per filter mix: (temperature, top_k, top_p, min_p).
ROWS = [
    (0.0, 0, 1.0, 0.0),     # greedy
    (0.8, 0, 1.0, 0.0),     # temperature only: the whole-vocabulary draw
    (1.0, 5, 1.0, 0.0),     # small top-k
    (0.7, 50, 0.9, 0.0),    # top-k + top-p
    (1.0, 300, 1.0, 0.0),   # top-k wider than every candidate tier
    (1.0, 0, 0.5, 0.0),     # narrow nucleus
    (1.3, 0, 0.97, 0.0),    # wide nucleus
    (1.0, 0, 1.0, 0.05),    # min-p
    (0.9, 20, 0.8, 0.1),    # all three
    (2.0, 0, 0.0, 0.0),     # top-p 0 keeps the top token(s)
    (0.5, 1, 1.0, 0.0),     # top-k 1
    (1.0, 0, 0.3, 0.5),     # top-p + min-p
]

# Rows that all fit the first tier with 64 candidates: a batch of them takes no wider tier.
NARROW = [
    (0.0, 0, 1.0, 0.0),     # greedy
    (1.0, 3, 1.0, 0.0),     # small top-k
    (0.7, 10, 0.9, 0.0),    # top-k + top-p
    (1.0, 0, 1.0, 0.3),     # min-p
    (0.9, 20, 0.8, 0.1),    # all three
    (2.0, 0, 0.0, 0.0),     # top-p 0
    (0.5, 1, 1.0, 0.0),     # top-k 1
    (1.0, 0, 0.3, 0.5),     # top-p + min-p
    (0.6, 8, 1.0, 0.0),
    (1.0, 4, 0.5, 0.0),
    (0.8, 2, 1.0, 0.0),
    (1.2, 30, 1.0, 0.2),
]


def reference(x, temperature, top_k, top_p, min_p, rule):
    """float64 probabilities by the definitions (cutoff.py), one row."""
    x = np.asarray(x, np.float64)
    if temperature == 0:
        out = np.zeros_like(x)
        out[np.argmax(x)] = 1.0
        return out
    weight = np.exp((x - x.max()) / temperature)
    keep = np.isfinite(x)
    if 0 < top_k < len(x):
        greater = len(x) - np.searchsorted(np.sort(x), x, side="right")
        keep &= greater < top_k
    kept = np.where(keep, weight, 0.0)
    if top_p < 1:
        order = np.argsort(-x, kind="stable")
        cum = np.cumsum(kept[order])
        desc = -x[order]
        n_above = np.searchsorted(desc, -x, side="left")  # tokens strictly larger
        n_at_least = np.searchsorted(desc, -x, side="right")
        above = np.where(n_above > 0, cum[np.maximum(n_above - 1, 0)], 0.0)
        if rule == "inclusive":
            keep_p = above < top_p * kept.sum()
        else:
            keep_p = cum[n_at_least - 1] <= top_p * kept.sum()
        keep &= keep_p | (x == x.max())
    keep &= weight >= min_p
    out = np.where(keep, weight, 0.0)
    return out / out.sum()


def _logits(seed, vocab=V):
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, (N, vocab)) * rng.uniform(0.5, 4.0, (N, 1))
    x[1::3] = np.round(x[1::3])  # ties, including ties at the cutoffs
    x[2] = np.sort(x[2])[::-1]  # the largest tokens clustered in the first chunks
    x[4, ::7] = -np.inf  # masked tokens
    # A peaked row: a few tokens far above the rest (small nucleus, wide top-k tail).
    x[5] = -1.5 * np.log(rng.permutation(np.arange(1, vocab + 1))) + rng.normal(0.0, 0.5, vocab)
    return x.astype(np.float32)


def _params(rule, candidates, shift=0, mix=ROWS):
    cols = np.roll(np.array(mix, np.float64), shift, axis=0).T
    return js.SamplingParams(
        temperature=cols[0].astype(np.float32),
        top_k=cols[1].astype(np.int32),
        top_p=cols[2].astype(np.float32),
        min_p=cols[3].astype(np.float32),
        top_p_rule=rule,
        candidates=candidates,
    )


def _columns(params):
    """The four per-row parameter arrays of ``params``, as numpy."""
    return [np.asarray(getattr(params, f)) for f in ("temperature", "top_k", "top_p", "min_p")]


def _resolution(x, params, rule, candidates, strided, finish=None):
    """``(rows, resolution)``: where the sampler answers each row of ``x`` (see cutoff.resolve),
    on the strided layout of ``sample`` or the layout of consecutive chunks of ``probs``."""
    # The module constants that tests here patch are read when tracing: part of the key.
    run = _resolution_program(rule, candidates, strided, finish,
                              cutoff.STORED_GATHER_BYTES, selection.BLOCK_BYTES)
    return run(jnp.asarray(x), tuple(map(jnp.asarray, _columns(params))))


@functools.lru_cache(maxsize=None)
def _resolution_program(rule, candidates, strided, finish, *patched):
    # One compiled program per setting, shared by the tests (run eagerly, each case took longer
    # than compiling it).
    def run(x, columns):
        layout = selection.make_strided_layout(x) if strided else sampling.make_layout(x, 64)
        rows = cutoff.prepare_rows(layout, *columns)
        return rows, cutoff.resolve(rows, rule, candidates, finish)

    return jax.jit(run)


def _reference_rows(x, params):
    cols = _columns(params)
    return np.stack([reference(x[i], *(c[i] for c in cols), params.top_p_rule) for i in range(N)])


def _expected_tokens(ref, u):
    """Inverse CDF in vocabulary order; None where u falls within rounding of a boundary."""
    tokens = []
    for row, v in zip(ref, u):
        cum = np.cumsum(row)
        target = v * cum[-1]
        token = min(int(np.searchsorted(cum, target, side="right")), int(np.flatnonzero(row)[-1]))
        near = np.min(np.abs(cum[row > 0] - target)) < 1e-6
        tokens.append(None if near else token)
    return tokens


CASES = [(rule, candidates, seed, "mixed") for rule in ("inclusive", "exclusive")
         for candidates in (4, 64) for seed in (0, 1)]
CASES += [(rule, 64, 0, "narrow") for rule in ("inclusive", "exclusive")]
MIXES = {"mixed": ROWS, "narrow": NARROW}


@pytest.mark.parametrize("rule, candidates, seed, mix", CASES)
def test_probs_and_draws_equal_the_definitions(rule, candidates, seed, mix):
    x = _logits(seed)
    params = _params(rule, candidates, shift=seed, mix=MIXES[mix])
    ref = _reference_rows(x, params)
    probs = np.asarray(js.probs(jnp.asarray(x), params))
    np.testing.assert_allclose(probs, ref, atol=2e-6, rtol=0)
    assert np.array_equal(probs > 0, ref > 0)  # same kept sets, ties included

    u = np.random.default_rng(100 + seed).uniform(size=N).astype(np.float32)
    tokens = np.asarray(js.sample_from_uniform(jnp.asarray(u), jnp.asarray(x), params))
    for token, expected in zip(tokens, _expected_tokens(ref, u)):
        assert expected is None or token == expected
    assert np.all(ref[np.arange(N), tokens] > 0)


@pytest.mark.parametrize("strided", [True, False], ids=["strided", "consecutive"])
def test_every_tier_answered_some_rows(strided):
    # Which tier answered each filtered row over the cases above: proof that they reach them all.
    tiers_used = {**{f"candidates x{w}": 0 for w in cutoff.TIER_WIDTHS}, "full": 0}
    for rule, candidates, seed, mix in CASES:
        params = _params(rule, candidates, shift=seed, mix=MIXES[mix])
        rows, res = _resolution(_logits(seed), params, rule, candidates, strided)
        for width, use in zip(cutoff.TIER_WIDTHS, res.used):
            tiers_used[f"candidates x{width}"] += int(np.asarray(use).sum())
        tiers_used["full"] += int((np.asarray(rows.filtered) & ~np.asarray(res.in_candidates)).sum())
    assert all(count > 0 for count in tiers_used.values()), tiers_used


@pytest.mark.parametrize("rule", ["inclusive", "exclusive"])
def test_a_padded_vocabulary_takes_the_same_rules(rule):
    # 300 tokens: no chunk length divides it, so the sampler pads row blocks.
    x = _logits(7, vocab=300)
    params = _params(rule, 64)
    ref = _reference_rows(x, params)
    probs = np.asarray(js.probs(jnp.asarray(x), params))
    np.testing.assert_allclose(probs, ref, atol=2e-6, rtol=0)
    u = np.linspace(0.03, 0.97, N, dtype=np.float32)
    tokens = np.asarray(js.sample_from_uniform(jnp.asarray(u), jnp.asarray(x), params))
    for token, expected in zip(tokens, _expected_tokens(ref, u)):
        assert expected is None or token == expected


@pytest.mark.parametrize("rule", ["inclusive", "exclusive"])
def test_first_tier_cutoffs_over_many_rows(rule):
    # 64 rows of 16384 tokens whose top-k and top-p cutoffs fall everywhere in the first tier's
    # candidates. The threshold search counts chunk maxima here, so the candidates hold more
    # tokens than the cutoffs keep: a rule that is off by a little (a budget 1% too large, a
    # rank off by one) changes some kept set.
    rows, vocab = 64, 16384
    rng = np.random.default_rng(11)
    x = (rng.normal(0.0, 1.0, (rows, vocab)) * rng.uniform(4.0, 8.0, (rows, 1))).astype(np.float32)
    x[::4] = np.round(x[::4])  # ties
    params = js.SamplingParams(
        temperature=np.tile(np.float32([0.5, 1.0, 1.5, 0.8]), rows // 4),
        top_k=np.tile(np.int32([0, 10, 40, 0, 25, 0, 5, 0]), rows // 8),
        top_p=np.tile(np.float32([0.3, 1.0, 0.9, 0.6, 1.0, 0.95, 0.5, 0.8]), rows // 8)
        * np.repeat(np.float32([1.0, 0.9, 0.8, 0.7, 1.0, 0.95, 0.85, 0.75]), rows // 8),
        min_p=np.zeros(rows, np.float32),
        top_p_rule=rule,
    )
    cols = _columns(params)
    ref = np.stack([reference(x[i], *(c[i] for c in cols), rule) for i in range(rows)])
    probs = np.asarray(js.probs(jnp.asarray(x), params))
    assert np.array_equal(probs > 0, ref > 0)
    np.testing.assert_allclose(probs, ref, atol=2e-6, rtol=0)
    for strided in (True, False):
        _, res = _resolution(x, params, rule, 64, strided)
        assert np.asarray(res.used[0]).mean() > 0.75  # the first tier answered most of them


@pytest.mark.parametrize("rule", ["inclusive", "exclusive"])
def test_cumulative_mass_exactly_at_top_p(rule):
    # Weights 1, 1/2, 1/4, 1/8 and a tied pair of 1/16 (total 2): cumulative fractions 1/2, 3/4,
    # 7/8, 15/16, 1 meet top_p exactly. At equality inclusive stops after the token that
    # reaches top_p, exclusive keeps it (its mass is <= p); a tied pair goes together. The
    # expected sets are written out: a float64 reference would see log(1/2^k) rounded to
    # float32 and miss the boundaries, while the sampler's float32 weights are exact here.
    halves = np.log(np.float32(0.5) ** np.arange(1, 6)).astype(np.float32)
    tokens = [3, 100, 101, 250, 400, 401]
    row = np.full(V, -np.inf, np.float32)
    row[tokens] = np.append(halves, halves[-1])
    weights = np.float64([1, 1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 16])
    if not np.array_equal(np.asarray(jnp.exp(jnp.asarray(row[tokens] - row[3]))), weights):
        # XLA:CPU's exp gives these powers of two exactly. XLA:GPU's (an H100, jax 0.11) gives
        # 0.12499999 for 1/8, and no float32 logit within 8 ulps of log(1/8) gets exactly 1/8.
        pytest.skip(f"{jax.default_backend()}'s exp misses the dyadic weights: no exact boundary")
    x = np.tile(row, (N, 1))
    top_p = np.float32([0.5, 0.75, 0.875, 0.9375, 0.96875, 0.6, 0.8, 0.9, 1.0, 0.0, 0.25, 0.99])
    kept = {"inclusive": [1, 2, 3, 4, 6, 2, 3, 4, 6, 1, 1, 6],
            "exclusive": [1, 2, 3, 4, 4, 1, 2, 3, 6, 1, 1, 4]}[rule]
    expected = np.zeros((N, V))
    for i, n in enumerate(kept):
        expected[i, tokens[:n]] = weights[:n] / weights[:n].sum()
    probs = np.asarray(js.probs(jnp.asarray(x), js.SamplingParams(top_p=top_p, top_p_rule=rule)))
    assert np.array_equal(probs > 0, expected > 0)
    np.testing.assert_allclose(probs, expected, atol=1e-7, rtol=0)


@pytest.mark.parametrize("strided", [True, False], ids=["strided", "consecutive"])
def test_a_row_past_every_tier_does_not_move_the_others(strided):
    # Each row takes the first tier that holds it. A row that no tier can take (top_k 1000:
    # more chunks hold a token above its threshold than the widest tier has slots) goes on to
    # the bisection, and every other row is answered by the tier it takes without that row.
    # 512 chunks, so the chunk count can rule tiers out.
    rng = np.random.default_rng(3)
    wide_logits = (rng.normal(0.0, 1.0, (N, 512 * 64)) * rng.uniform(2.0, 4.0, (N, 1))).astype(np.float32)

    def tiers_of(mix):
        _, res = _resolution(wide_logits, _params("inclusive", 64, mix=mix), "inclusive", 64, strided)
        return np.stack([np.asarray(u) for u in res.used]), np.asarray(res.in_candidates)

    with_wide = list(NARROW)
    with_wide[1] = (1.0, 1000, 1.0, 0.0)
    narrow_tiers, _ = tiers_of(NARROW)
    tiers, in_candidates = tiers_of(with_wide)
    others = np.arange(N) != 1
    assert narrow_tiers[0].sum() > 0 and np.array_equal(tiers[:, others], narrow_tiers[:, others])
    assert not in_candidates[1]


# One rule each for the two tests below: what they check (where the chunks are gathered, which
# row blocks run) does not depend on it, and each compiles programs no other test shares.
@pytest.mark.parametrize("rule", ["exclusive"])
def test_stored_and_fused_chunk_gathers_give_the_same_candidates(rule, monkeypatch):
    # A tier gathers its chunks into a buffer when that stays within STORED_GATHER_BYTES, and
    # fuses the gather into the run maxima beyond (wide tiers of large batches). Forcing the
    # fused path on the small cases here must change nothing, in any tier. (Chunks of
    # consecutive tokens only: a strided layout gathers tokens, not runs.)
    x, params = _logits(0), _params(rule, 4)
    # Each tier hands on its candidates as they are, in place of the draw.
    candidates_of = lambda rows, cands, ids: (cands.values, cands.indices, cands.keep)
    _, stored = _resolution(x, params, rule, 4, False, candidates_of)
    monkeypatch.setattr(cutoff, "STORED_GATHER_BYTES", 0)
    _, fused = _resolution(x, params, rule, 4, False, candidates_of)
    assert sum(int(np.asarray(u).sum()) for u in stored.used) > 0
    for a, b in zip(jax.tree.leaves((stored.finished, stored.used, stored.threshold)),
                    jax.tree.leaves((fused.finished, fused.used, fused.threshold))):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("rule", ["inclusive"])
def test_rows_scattered_over_row_blocks_keep_their_own_answers(rule, monkeypatch):
    # The passes over the vocabulary (the bisection, the draw's exp pass) run by row blocks,
    # only in the blocks holding a row that needs them, those rows gathered first. With blocks
    # of 2 rows, the rows that need them here are scattered over the batch: each must still
    # get its own answer, in both the probabilities and the draw.
    vocab = 640  # a shape no other test compiles: the block size is read when tracing
    monkeypatch.setattr(selection, "BLOCK_BYTES", 2 * 4 * vocab)
    assert selection.block_rows(N, vocab) == 2
    x, params = _logits(0, vocab), _params(rule, 4)
    rows, res = _resolution(x, params, rule, 4, True)
    over_vocab = (np.asarray(rows.filtered) & ~np.asarray(res.in_candidates)) | np.asarray(rows.unfiltered)
    scattered = np.flatnonzero(over_vocab)
    assert 2 <= len(scattered) < N and scattered[-1] >= len(scattered), scattered

    ref = _reference_rows(x, params)
    probs = np.asarray(js.probs(jnp.asarray(x), params))
    np.testing.assert_allclose(probs, ref, atol=2e-6, rtol=0)
    assert np.array_equal(probs > 0, ref > 0)
    u = np.random.default_rng(7).uniform(size=N).astype(np.float32)
    tokens = np.asarray(js.sample_from_uniform(jnp.asarray(u), jnp.asarray(x), params))
    for token, expected in zip(tokens, _expected_tokens(ref, u)):
        assert expected is None or token == expected
    assert np.all(ref[np.arange(N), tokens] > 0)

    # Every row drawing over the vocabulary: every block runs, on consecutive rows, read in place.
    # The same static settings as above, so the compiled program is reused.
    plain = js.SamplingParams(temperature=0.8, top_p_rule=rule, candidates=4)
    ref = np.stack([reference(row, 0.8, 0, 1.0, 0.0, rule) for row in x])
    tokens = np.asarray(js.sample_from_uniform(jnp.asarray(u), jnp.asarray(x), plain))
    expected = _expected_tokens(ref, u)
    assert sum(e is not None for e in expected) >= N - 1
    for token, e in zip(tokens, expected):
        assert e is None or token == e


def test_row_subsets_run_only_the_blocks_their_active_rows_fill():
    # The wider tiers run over blocks of row ids, active rows first (selection.map_row_subsets).
    # Blocks of 2 here: the 3 active rows fill 2 blocks, the second completed by the first
    # inactive row (0); every other row's block does not run and gives zeros. Results come back
    # in the batch's order, each row's its own.
    # In style "straight" one block of every row runs and only the active rows keep their values.
    from jsample import control

    active = np.zeros(N, bool)
    active[[1, 4, 8]] = True
    fn = lambda ids: (10 * ids + 1).astype(jnp.float32)
    for style, filled in (("branches", [0, 1, 4, 8]), ("straight", [1, 4, 8])):
        with control.use(style):
            out = selection.map_row_subsets(fn, jnp.asarray(active), 2)
        expected = np.zeros(N, np.float32)
        expected[filled] = 10 * np.array(filled) + 1
        np.testing.assert_array_equal(np.asarray(out), expected, err_msg=style)
    assert selection.subset_rows(12) == 6 and selection.subset_rows(64) == 8
    assert selection.subset_rows(7) == 7 and selection.subset_rows(1) == 1


@pytest.mark.parametrize("n, slots", [(1024, 64), (801, 13), (96, 16)])
def test_compaction_moves_the_flagged_positions_to_the_front_in_order(n, slots):
    # compact locates each slot's block when a row is long enough (one scattered add per block,
    # not a scattered write per entry), else scatters every entry. Both must give the first
    # `slots` flagged positions in order, then zeros, and the full count: none flagged, all,
    # more than the slots, only the last.
    rng = np.random.default_rng(n)
    flags = rng.uniform(size=(8, n)) < rng.uniform(0.0, 3 * slots / n, size=(8, 1))
    flags[0], flags[1], flags[2] = False, True, False
    flags[2, -1] = True
    want = np.zeros((8, slots), np.int32)
    for r, row in enumerate(flags):
        first = np.flatnonzero(row)[:slots]
        want[r, : len(first)] = first
    forms = {"blocks": lambda f: selection._compact_by_blocks(f, slots, selection.COMPACT_BLOCK),
             "compact": lambda f: selection.compact(f, slots)}
    for name, form in forms.items():
        source, count = jax.jit(form)(jnp.asarray(flags))
        np.testing.assert_array_equal(np.asarray(source), want, err_msg=name)
        np.testing.assert_array_equal(np.asarray(count), flags.sum(1), err_msg=name)
    assert (n >= slots * selection.COMPACT_BLOCK) == (n != 96)  # both forms of compact ran


# ----------------------------------------------------------------------------- control styles
# Off the CPU the sampler runs in style "straight" (jsample/control.py): cheap branches become
# selects, searches run a fixed number of steps, rows are not blocked. CI has no GPU, so the
# style is forced here; it must give exactly what style "branches" gives, on every path.
STYLE_CASES = [
    ("f32-strided", np.float32, V),  # the strided layout of sample
    # bfloat16, with a chunk that does not divide the vocabulary: padded copies in row blocks
    ("bf16-padded", jnp.bfloat16, V - 12),
]


@pytest.mark.parametrize("name, dtype, vocab", STYLE_CASES, ids=[c[0] for c in STYLE_CASES])
def test_straight_style_samples_exactly_as_branches(name, dtype, vocab):
    from jsample import control

    x = _logits(0, vocab)
    x[7, 3] = np.nan  # a NaN row: the sanitising second sample runs
    x[9, :4] = x[9].max()  # the maximum tied in several groups: the greedy rescan's case
    x = jnp.asarray(x).astype(dtype)
    params = _params("inclusive", 4, shift=3)  # candidates 4: every tier and the bisection
    u = jnp.asarray(np.random.default_rng(5).uniform(size=N).astype(np.float32))
    out = {}
    for style in control.STYLES:
        with control.use(style):
            assert control.style() == style
            out[style] = js.sample_from_uniform(u, x, params, return_logprobs=True)
    np.testing.assert_array_equal(np.asarray(out["straight"][0]), np.asarray(out["branches"][0]))
    np.testing.assert_allclose(np.asarray(out["straight"][1]), np.asarray(out["branches"][1]),
                               atol=1e-6, rtol=0)
    if name == "f32-strided":
        probs = {}
        for style in control.STYLES:
            with control.use(style):
                probs[style] = np.asarray(js.probs(x, params))
        np.testing.assert_allclose(probs["straight"], probs["branches"], atol=1e-7, rtol=0)
        assert np.array_equal(probs["straight"] > 0, probs["branches"] > 0)


def test_control_style_follows_the_backend_and_checks_its_argument():
    from jsample import control

    assert control.style() == ("straight" if jax.default_backend() == "gpu" else "branches")
    with pytest.raises(ValueError, match="style must be one of"):
        with control.use("fast"):
            pass
    # run_if: a runtime branch, or a select in style "straight"; both give the same values.
    for style in control.STYLES:
        with control.use(style):
            # A branch worth skipping: XLA:GPU turns a conditional between constants into a select.
            f = jax.jit(lambda p, x: control.run_if(p, lambda: jnp.sort(-x)[0], jnp.float32(2.0)))
            x = jnp.arange(1024, dtype=jnp.float32)
            assert float(f(True, x)) == -1023.0 and float(f(False, x)) == 2.0
            hlo = f.lower(True, x).compile().as_text()
            assert ("conditional(" in hlo) == (style == "branches")
