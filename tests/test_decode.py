"""The decode loop's contract, on a tiny linen model built here and on the bundled NNX model.

Both models keep one batch and output shape throughout, so each compiles its loop once.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jsample as js
from jsample.model import ModelStep, encode, generate, load

# ---------------------------------------------------------------------------------------------
# A tiny recurrent linen model: its "cache" collection carries a memory vector per row.

V, B, T = 16, 5, 12
EOS, PAD = 1, V - 1


class TinyLM(nn.Module):
    @nn.compact
    def __call__(self, tokens):  # int [B] -> logits [B, V]
        memory = self.variable("cache", "memory", jnp.zeros, (tokens.shape[0], 8))
        memory.value = jnp.tanh(0.7 * memory.value + nn.Embed(V, 8)(tokens))
        return 3.0 * nn.Dense(V)(memory.value)


TINY = TinyLM()


def linen_step(state, tokens):
    """The README's linen pattern; the state also counts the forward passes run."""
    weights, cache, passes = state
    logits, mutated = TINY.apply({"params": weights, "cache": cache}, tokens, mutable=["cache"])
    return logits, (weights, mutated["cache"], passes + 1)


@pytest.fixture(scope="module")
def tiny():
    variables = TINY.init(jax.random.key(0), jnp.zeros((B,), jnp.int32))

    def start(prompt, weights=variables["params"]):
        """Feeds one prompt token per row: the first logits and the decode state."""
        cache = jax.tree.map(jnp.zeros_like, variables["cache"])
        logits, (weights, cache, _) = linen_step((weights, cache, jnp.int32(0)), prompt)
        return logits, (weights, cache, jnp.int32(0))

    return start


PROMPT = jnp.array([2, 3, 4, 5, 6])
ROW_PARAMS = js.SamplingParams(
    temperature=jnp.array([1.0, 0.0, 0.7, 1.5, 1.0]),
    top_k=jnp.array([0, 0, 4, 0, 8]),
    top_p=jnp.array([1.0, 1.0, 0.9, 0.8, 1.0]),
    min_p=jnp.array([0.0, 0.0, 0.0, 0.0, 0.05]),
)


def check_well_formed(out, max_new_tokens, eos, pad):
    """Stop token kept and counted, pad after it, logprobs 0 there and <= 0 before."""
    tokens, lengths, logprobs = map(np.asarray, (out.tokens, out.lengths, out.logprobs))
    assert tokens.shape == logprobs.shape == (len(lengths), max_new_tokens)
    assert tokens.dtype == np.int32 and lengths.dtype == np.int32 and logprobs.dtype == np.float32
    for row, n in zip(range(len(lengths)), lengths):
        assert 1 <= n <= max_new_tokens
        assert eos not in tokens[row, : n - 1].tolist()
        if n < max_new_tokens:
            assert tokens[row, n - 1] == eos
        assert np.all(tokens[row, n:] == pad) and np.all(logprobs[row, n:] == 0.0)
        assert np.all(logprobs[row, :n] <= 0.0) and np.all(np.isfinite(logprobs[row, :n]))


class TestTinyLinenModel:
    def decode(self, tiny, key, params=ROW_PARAMS, prompt=PROMPT, **kw):
        logits, state = tiny(prompt)
        kw = {"max_new_tokens": T, "eos_id": EOS, "pad_id": PAD, **kw}
        return js.decode(linen_step, state, logits, key, params, **kw)

    def test_stop_token_padding_lengths_and_early_exit(self, tiny):
        out = self.decode(tiny, jax.random.key(3))
        check_well_formed(out, T, EOS, PAD)
        lengths = np.asarray(out.lengths)
        assert lengths.min() < T, "the seed should make some row stop early"
        # One forward pass per token except each step's last: the loop ran max(lengths) steps.
        assert int(out.state[2]) == lengths.max() - 1

    def test_loop_exits_when_every_row_has_stopped(self, tiny):
        logits, state = tiny(PROMPT)
        forced = jnp.full_like(logits, -10.0).at[:, EOS].set(10.0)  # EOS first, for every row
        out = js.decode(linen_step, state, forced, jax.random.key(0), ROW_PARAMS,
                        max_new_tokens=T, eos_id=EOS, pad_id=PAD)
        assert out.lengths.tolist() == [1] * B and int(out.state[2]) == 0
        assert out.tokens[:, 0].tolist() == [EOS] * B and np.all(out.tokens[:, 1:] == PAD)

    def test_without_eos_every_row_runs_to_max_new_tokens(self, tiny):
        out = self.decode(tiny, jax.random.key(3), eos_id=None)
        assert out.lengths.tolist() == [T] * B and int(out.state[2]) == T - 1
        check_well_formed(out, T, eos=-1, pad=PAD)

    def test_logprobs_are_those_of_the_per_row_distributions(self, tiny):
        out = self.decode(tiny, jax.random.key(4))
        logits, state = tiny(PROMPT)
        for t in range(int(out.lengths.max())):
            log_p = js.log_probs(logits, ROW_PARAMS)
            token = out.tokens[:, t]
            live = np.asarray(out.lengths) > t
            expected = jnp.take_along_axis(log_p, token[:, None], axis=1)[:, 0]
            np.testing.assert_allclose(np.asarray(out.logprobs[:, t])[live],
                                       np.asarray(expected)[live], rtol=1e-5, atol=1e-5)
            logits, state = linen_step(state, token)
        # Row 1 is greedy: probability 1 at each step.
        assert np.all(out.logprobs[1] == 0.0)

    def test_same_key_same_output_new_key_new_output(self, tiny):
        a, b = self.decode(tiny, jax.random.key(5)), self.decode(tiny, jax.random.key(5))
        c = self.decode(tiny, jax.random.key(6))
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.logprobs, b.logprobs)
        assert not np.array_equal(a.tokens, c.tokens)

    def test_one_key_means_fold_in_of_the_row_index(self, tiny):
        key = jax.random.key(7)
        rows = jnp.stack([jax.random.fold_in(key, b) for b in range(B)])
        assert np.array_equal(self.decode(tiny, key).tokens, self.decode(tiny, rows).tokens)

    def test_reordering_rows_reorders_the_output_with_per_row_keys(self, tiny):
        keys = jax.random.split(jax.random.key(8), B)
        perm = np.array([3, 0, 4, 2, 1])
        shuffled = jax.tree.map(lambda a: a[perm], ROW_PARAMS)
        out = self.decode(tiny, keys)
        moved = self.decode(tiny, keys[perm], params=shuffled, prompt=PROMPT[perm])
        assert np.array_equal(moved.tokens, out.tokens[perm])
        assert np.array_equal(moved.lengths, out.lengths[perm])
        np.testing.assert_allclose(moved.logprobs, out.logprobs[perm], atol=1e-6)

    def test_a_row_ignores_the_other_rows(self, tiny):
        keys = jax.random.split(jax.random.key(9), B)
        out = self.decode(tiny, keys)
        other_keys = keys.at[1:].set(jax.random.split(jax.random.key(10), B - 1))
        other = self.decode(tiny, other_keys, prompt=PROMPT.at[1:].set(7))
        assert np.array_equal(other.tokens[0], out.tokens[0])
        assert not np.array_equal(other.tokens[1:], out.tokens[1:])

    def test_greedy_equals_an_argmax_rollout(self, tiny):
        greedy = js.SamplingParams(temperature=0.0)
        out = self.decode(tiny, jax.random.key(0), params=greedy)
        logits, state = tiny(PROMPT)
        expected = np.full((B, T), PAD)
        done = np.zeros(B, bool)
        for t in range(T):
            token = np.where(done, PAD, np.argmax(np.asarray(logits), axis=-1))
            expected[:, t] = token
            done |= token == EOS
            logits, state = linen_step(state, jnp.asarray(token, jnp.int32))
        assert np.array_equal(out.tokens, expected)
        assert np.all(out.logprobs == 0.0)

    def test_new_values_keys_prompts_and_weights_never_recompile(self, tiny):
        traces = []

        def counted_step(state, tokens):  # a fresh function: its own compiled loop
            traces.append(1)
            return linen_step(state, tokens)

        def run(key, params, prompt=PROMPT, weights=None, **kw):
            logits, state = tiny(prompt) if weights is None else tiny(prompt, weights)
            kw = {"max_new_tokens": T, "eos_id": EOS, "pad_id": PAD, **kw}
            return js.decode(counted_step, state, logits, key, params, **kw)

        first = run(jax.random.key(0), js.SamplingParams(temperature=0.5))
        run(jax.random.key(1), js.SamplingParams(temperature=1.0, top_k=3, top_p=0.5, min_p=0.1))
        run(jax.random.split(jax.random.key(2), B), ROW_PARAMS)
        run(jax.random.key(3), ROW_PARAMS, prompt=PROMPT + 1, eos_id=None, pad_id=0)
        weights = TINY.init(jax.random.key(1), PROMPT)["params"]
        moved = run(jax.random.key(0), js.SamplingParams(temperature=0.5), weights=weights)
        assert len(traces) == 1
        assert not np.array_equal(first.tokens, moved.tokens)

    def test_zero_new_tokens(self, tiny):
        out = self.decode(tiny, jax.random.key(0), max_new_tokens=0)
        assert out.tokens.shape == (B, 0) and out.lengths.tolist() == [0] * B


class TestErrors:
    """Checked before tracing: each names the argument."""

    logits = jnp.zeros((2, V))

    def call(self, **kw):
        args = {"step_fn": linen_step, "state": (), "logits": self.logits,
                "key": jax.random.key(0), "params": None, "max_new_tokens": 3, **kw}
        return js.decode(args.pop("step_fn"), args.pop("state"), args.pop("logits"),
                         args.pop("key"), args.pop("params"), **args)

    @pytest.mark.parametrize("kw, error, match", [
        ({"logits": jnp.zeros((2, 3, V))}, ValueError, r"logits must have shape \[batch, vocab\]"),
        ({"logits": jnp.zeros((2, V), jnp.int32)}, TypeError, "floating dtype"),
        ({"key": jax.random.split(jax.random.key(0), 3)}, ValueError, "one key per row"),
        ({"key": 0}, TypeError, "key must be a JAX PRNG key"),
        ({"max_new_tokens": -1}, ValueError, "max_new_tokens must be a Python int >= 0"),
        ({"max_new_tokens": 2.0}, ValueError, "max_new_tokens"),
        ({"eos_id": V}, ValueError, r"eos_id must be a token id in \[0, 16\)"),
        ({"eos_id": 1.5}, TypeError, "eos_id must be an integer scalar"),
        ({"pad_id": [0, 1]}, TypeError, "pad_id must be an integer scalar"),
        ({"params": js.SamplingParams(top_k=jnp.array([1, 2, 3]))}, ValueError, "top_k has shape"),
        ({"params": {"temperature": 1.0}}, TypeError, "params must be a jsample.SamplingParams"),
        ({"step_fn": "step"}, TypeError, "step_fn must be callable"),
    ])
    def test_bad_arguments(self, kw, error, match):
        with pytest.raises(error, match=match):
            self.call(**kw)

    def test_step_fn_with_the_wrong_logits_shape(self):
        with pytest.raises(ValueError, match=r"step_fn must return logits of shape \(2, 16\)"):
            self.call(step_fn=lambda s, t: (jnp.zeros((2, V + 1)), s))

    def test_step_fn_that_changes_the_state(self):
        with pytest.raises(TypeError, match="same structure, shapes and dtypes"):
            self.call(step_fn=lambda s, t: (jnp.zeros((2, V)), s + 1.0), state=jnp.int32(0))


# ---------------------------------------------------------------------------------------------
# The bundled byte-level NNX model. A space ends a row: frequent in any English-like text.

PROMPTS = ["The return value of ", "A list is", "Tuples "]
SPACE, N_NEW = ord(" "), 64


@pytest.fixture(scope="module")
def model():
    return load()


def byte_params():
    return js.SamplingParams(temperature=jnp.array([1.0, 0.8, 0.0]), top_k=jnp.array([0, 40, 0]),
                             top_p=jnp.array([0.95, 1.0, 1.0]))


class TestBundledModel:
    def test_stop_token_padding_reproducibility(self, model):
        run = lambda seed: generate(model, PROMPTS, jax.random.key(seed), byte_params(),
                                    max_new_tokens=N_NEW, eos_id=SPACE)
        texts, out = run(0)
        check_well_formed(out, N_NEW, SPACE, 0)
        assert np.all(np.asarray(out.lengths) < N_NEW)
        assert all(text.endswith(" ") and " " not in text[:-1] for text in texts)
        again, other = run(0)[1], run(1)[1]
        assert np.array_equal(again.tokens, out.tokens)
        assert not np.array_equal(other.tokens[:2], out.tokens[:2])
        assert np.array_equal(other.tokens[2], out.tokens[2])  # row 2 is greedy

    def test_greedy_equals_an_argmax_rollout(self, model):
        out = generate(model, PROMPTS, jax.random.key(0), js.SamplingParams(temperature=0.0),
                       max_new_tokens=N_NEW, eos_id=None)[1]
        tokens, lengths = encode(PROMPTS, model.config.window)
        logits, cache = nnx.jit(lambda m, t, n: m.prefill(t, n))(model, tokens, lengths)
        step = nnx.jit(lambda m, c, t: m.step(c, t))
        expected = []
        for _ in range(N_NEW):
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            expected.append(token)
            logits, cache = step(model, cache, token)
        assert np.array_equal(out.tokens, np.stack(expected, axis=1))

    def test_reordering_prompts_and_keys_reorders_the_output(self, model):
        keys = jax.random.split(jax.random.key(2), 3)
        params = js.SamplingParams(temperature=jnp.array([1.0, 0.8, 1.2]), top_p=0.95)
        perm = np.array([2, 0, 1])
        out = generate(model, PROMPTS, keys, params, max_new_tokens=N_NEW, eos_id=SPACE)[1]
        moved = generate(model, [PROMPTS[i] for i in perm], keys[perm],
                         params.replace(temperature=params.temperature[perm]),
                         max_new_tokens=N_NEW, eos_id=SPACE)[1]
        assert np.array_equal(moved.tokens, out.tokens[perm])
        assert np.array_equal(moved.lengths, out.lengths[perm])

    def test_new_prompts_values_and_keys_never_recompile(self, model):
        traces = []

        @dataclasses.dataclass(frozen=True)
        class CountingStep(ModelStep):  # a new class: its own compiled loop
            def __call__(self, state, tokens):
                traces.append(1)
                return super().__call__(state, tokens)

        graphdef, weights = nnx.split(model)
        for seed, prompt in enumerate(["Hello", "A much longer prompt than the first one", "x"]):
            tokens, lengths = encode([prompt] * 3, model.config.window)
            logits, cache = model.prefill(jnp.asarray(tokens), jnp.asarray(lengths))
            js.decode(CountingStep(graphdef), (weights, cache), logits, jax.random.key(seed),
                      js.SamplingParams(temperature=0.5 + seed, top_k=seed * 10),
                      max_new_tokens=N_NEW, eos_id=SPACE if seed % 2 else None)
        assert len(traces) == 1

    def test_inside_nnx_jit_matches_split_merge(self, model):
        @nnx.jit
        def generate_in_jit(model, tokens, lengths, key, params):
            logits, cache = model.prefill(tokens, lengths)
            graphdef, weights = nnx.split(model)

            def step(state, tokens):
                weights, cache = state
                logits, cache = nnx.merge(graphdef, weights).step(cache, tokens)
                return logits, (weights, cache)

            return js.decode(step, (weights, cache), logits, key, params,
                             max_new_tokens=N_NEW, eos_id=SPACE).tokens

        params, key = byte_params(), jax.random.key(12)
        tokens, lengths = encode(PROMPTS, model.config.window)
        inside = generate_in_jit(model, jnp.asarray(tokens), jnp.asarray(lengths), key, params)
        outside = generate(model, PROMPTS, key, params, max_new_tokens=N_NEW, eos_id=SPACE)[1]
        assert np.array_equal(inside, outside.tokens)

    def test_ring_cache_matches_a_banded_full_forward(self):
        """Past the window the cache keeps the last ``window`` positions; check against a full
        forward whose attention is limited to the same band (a small random model, exact)."""
        from jsample.model import Config, Transformer
        from jsample.model.transformer import _attend

        # Float32 products in full precision: a GPU's default (TF32) rounds the two orders apart.
        with jax.default_matmul_precision("highest"):
            config = Config(dim=32, heads=2, layers=2, hidden=64, window=8)
            small = nnx.jit(lambda: Transformer(config, rngs=nnx.Rngs(1)))()
            seq = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 30)), jnp.int32)
            logits, cache = nnx.jit(lambda m, t: m.prefill(t, jnp.array([5, 5])))(small, seq[:, :5])
            step = nnx.jit(lambda m, c, t: m.step(c, t))
            stepped = [logits]
            for t in range(5, 29):
                logits, cache = step(small, cache, seq[:, t])
                stepped.append(logits)

            @nnx.jit
            def banded(small, seq):
                i = jnp.arange(seq.shape[1])
                band = ((i[None] <= i[:, None]) & (i[None] > i[:, None] - 8))[None]
                x, positions = small.embed(seq), jnp.broadcast_to(i, seq.shape)
                for block in small.blocks:
                    q, k, v = block.project(x, positions)
                    x = block.finish(x, _attend(q, k, v, band))
                return small._logits(x)

            full = banded(small, seq)
            np.testing.assert_allclose(np.stack(stepped, 1), full[:, 4:29], atol=1e-5)
