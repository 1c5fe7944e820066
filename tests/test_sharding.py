"""jsample.sample_sharded: the tokens of jsample.sample, drawn from logits split over a device mesh.

Runs on 8 devices (the simulated CPU devices of conftest.py where the default backend has fewer),
over meshes (data, model) = (8, 1), (1, 8) and (2, 4). Every row of the batch has its own
parameter mix, so one compiled program per mesh covers greedy, temperature only, top-k, top-p,
min-p, their combinations, both tiers of the cutoff (candidates and the full-vocabulary
bisection) and rows with NaN, +inf or no finite logit.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jsample as js
from jsample import sharding

B, V = 16, 4096
MESHES = [(8, 1), (1, 8), (2, 4)]

# One parameter mix per row: (temperature, top_k, top_p, min_p).
MIX = [
    (0.0, 0, 1.0, 0.0),  # greedy
    (1.0, 0, 1.0, 0.0),  # plain softmax: drawn over the whole vocabulary
    (0.6, 0, 1.0, 0.0),  # temperature only
    (1.0, 1, 1.0, 0.0),
    (1.0, 50, 1.0, 0.0),
    (1.0, 200, 1.0, 0.0),  # top-k above the 64 candidates: exact bisection tier
    (1.0, 0, 0.9, 0.0),  # top-p without top-k: needs the softmax normaliser of the whole row
    (1.0, 0, 0.75, 0.0),  # an exact top-p boundary on the dyadic row of the "special" logits
    (1.0, 0, 1.0, 0.1),
    (1.5, 0, 1.0, 0.05),
    (0.9, 40, 0.9, 0.02),
    (1.0, 0, 0.0, 0.0),  # top-p 0 keeps the top token
    (1.0, 0, 0.999, 0.0),  # wide nucleus: bisection on flat logits
    (1.0, V, 1.0, 0.0),  # top-k = vocab is off; an all -inf row in the "special" logits
    (0.0, 5, 0.5, 0.0),  # greedy wins over the filters
    (1.0, 100, 0.95, 0.0),  # top-k and top-p both beyond the candidates
]


def _params(rule="inclusive"):
    t, k, p, m = (np.array(col) for col in zip(*MIX))
    return js.SamplingParams(
        temperature=t.astype(np.float32), top_k=k.astype(np.int32), top_p=p.astype(np.float32),
        min_p=m.astype(np.float32), top_p_rule=rule,
    )


def _family(name, seed):
    rng = np.random.default_rng(seed)
    if name == "normal":
        x = rng.normal(0.0, 2.0, (B, V))
    elif name == "ties":  # half-integer logits: ties at every cutoff and at the row maximum
        x = np.round(rng.normal(0.0, 2.0, (B, V)) * 2) / 2
    elif name == "flat":  # wide nuclei: top-p rows fall back to the bisection tier
        x = rng.normal(0.0, 0.1, (B, V))
    else:  # "special"
        x = rng.normal(0.0, 2.0, (B, V))
        x[0, [900, 2600]] = 50.0  # greedy: a maximum tied across shards, the first one wins
        x[1, 7] = np.nan
        x[2, [100, 3000]] = np.inf  # +inf ties for the top
        x[7] = -np.inf  # masses 1/2, 1/4, 1/8, 1/8 spread over the shards; top-p 0.75 is exact
        x[7, [4000, 1500, 600, 2900]] = np.log([0.5, 0.25, 0.125, 0.125])
        x[13] = -np.inf
    return x.astype(np.float32)


FAMILIES = ["normal", "ties", "flat", "special"]


# The meshes need 8 devices: the default backend's where it has them, else the simulated CPU
# devices (a machine with one GPU), which then also compute the unsharded references, so that
# both sides round alike.
DEVICES = jax.devices() if jax.device_count() >= 8 else jax.devices("cpu")


@pytest.fixture(autouse=True)
def _on_the_mesh_platform():
    with jax.default_device(DEVICES[0]):
        yield


def _mesh(shape, axis_types=None):
    return jax.make_mesh(shape, ("data", "model"), axis_types, devices=DEVICES[:math.prod(shape)])


def _place(x, mesh, spec=P("data", "model")):
    return jax.device_put(x, NamedSharding(mesh, spec))


def _assert_same(key, x, params, mesh, **axes):
    want, want_lp = js.sample(key, x, params, return_logprobs=True)
    got, got_lp = js.sample_sharded(key, _place(x, mesh, P(axes.get("batch_axis", "data"),
                                                            axes.get("vocab_axis", "model"))),
                                    params, mesh=mesh, return_logprobs=True, **axes)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # Log-probabilities agree to float rounding: the normalisers are sums in another order.
    np.testing.assert_allclose(np.asarray(got_lp), np.asarray(want_lp), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: f"mesh{s[0]}x{s[1]}")
def test_tokens_equal_unsharded_sampling(shape):
    mesh = _mesh(shape)
    params = _params()
    for i, name in enumerate(FAMILIES):
        x = _family(name, seed=i)
        for seed in range(3):
            _assert_same(jax.random.key(10 * i + seed), x, params, mesh)


def test_exclusive_top_p_rule():
    mesh = _mesh((1, 8))
    params = _params("exclusive")
    for i, name in enumerate(FAMILIES):
        _assert_same(jax.random.key(i), _family(name, seed=i), params, mesh)


def test_one_key_per_row():
    mesh = _mesh((2, 4))
    params = _params()
    for i, name in enumerate(FAMILIES):
        keys = jax.random.split(jax.random.key(100 + i), B)
        _assert_same(keys, _family(name, seed=i), params, mesh)


def test_sample_names_the_ways_out_for_explicitly_sharded_logits():
    # jsample.sample reshapes and gathers along both axes, which explicit sharding rejects deep
    # inside; it says what to do instead, and both ways out draw its tokens.
    mesh = _mesh((2, 4), (AxisType.Explicit,) * 2)
    x = _family("normal", seed=0)
    placed = _place(x, mesh)
    params, key = _params(), jax.random.key(5)
    for call in (lambda v: js.sample(key, v, params), lambda v: js.probs(v, params),
                 jax.jit(lambda v: js.sample(key, v, params))):
        with pytest.raises(ValueError, match=r"explicit mesh axes \['data', 'model'\].*sample_sharded"):
            call(placed)
    want = js.sample(key, x, params)
    np.testing.assert_array_equal(js.sample_sharded(key, placed, params, mesh=mesh), want)
    replicated = jax.sharding.reshard(placed, NamedSharding(mesh, P()))
    np.testing.assert_array_equal(js.sample(key, replicated, params), want)


def test_blocks_that_split_chunks():
    # 4000 tokens over 4 shards: 1000 per shard is not a multiple of the draw's 32-token
    # chunks, so shards borrow the start of the next block to finish their last chunk.
    mesh = _mesh((2, 4))
    params = _params()
    for i, name in enumerate(FAMILIES):
        x = _family(name, seed=20 + i)[:, :4000]
        _assert_same(jax.random.key(20 + i), x, params, mesh)


@pytest.mark.parametrize("vocab,shards", [(4096, 8), (32000, 8), (128256, 8), (151936, 8),
                                          (1000, 8), (64, 8), (4000, 4)])
def test_chunk_plan_gives_every_chunk_one_owner_in_order(vocab, shards):
    plan = sharding._chunk_plan(vocab, shards)
    chunks = -(-vocab // plan.chunk)
    owned = [c for s in range(shards) for c in range(plan.first[s], plan.first[s] + plan.owned[s])]
    assert owned == list(range(chunks))
    for s in range(shards):
        # Each owned chunk starts in the shard's block and ends within the next `halo` tokens.
        assert plan.offsets[s] == plan.first[s] * plan.chunk - s * plan.width >= 0
        end = (plan.first[s] + plan.owned[s]) * plan.chunk
        assert end <= (s + 1) * plan.width + plan.halo or s == shards - 1
    assert plan.halo <= plan.width


def test_whole_mesh_on_the_vocabulary_and_replicated_rows():
    # Both mesh axes split the vocabulary (a tuple of axis names); every device holds all rows.
    mesh = _mesh((2, 4))
    _assert_same(jax.random.key(7), _family("normal", seed=7), _params(), mesh,
                 vocab_axis=("data", "model"), batch_axis=None)


def test_checked_mode_reports_bad_logits_per_row_not_per_shard():
    mesh = _mesh((1, 8))
    x = _family("normal", seed=0)
    x[:, : V // 2] = -np.inf  # finite logits in half the shards only: not worth a report
    fn = js.checked(jax.jit(lambda k, logits: js.sample_sharded(k, logits, _params(), mesh=mesh)))
    err, tokens = fn(jax.random.key(0), _place(x, mesh))
    assert err.get() is None
    np.testing.assert_array_equal(tokens, js.sample(jax.random.key(0), x, _params()))
    x[5, 3000] = np.nan
    err, _ = fn(jax.random.key(0), _place(x, mesh))
    assert "row 5" in err.get() and "holds NaN" in err.get()


def _embedding_step(state, tokens):
    """A stand-in for a tensor-parallel LM: logits = embedding(tokens) @ head."""
    embedding, head = state
    return embedding[tokens] @ head, state


def test_decode_with_a_mesh_draws_the_unsharded_tokens():
    mesh = _mesh((2, 4), (AxisType.Auto,) * 2)
    rng = np.random.default_rng(0)
    embedding = rng.normal(0.0, 1.0, (V, 16)).astype(np.float32)
    head = rng.normal(0.0, 1.0, (16, V)).astype(np.float32)
    first = _family("normal", seed=0)
    params = _params()
    want = js.decode(_embedding_step, (embedding, head), first, jax.random.key(0), params,
                     max_new_tokens=6)
    got = js.decode(_embedding_step, (embedding, _place(head, mesh, P(None, "model"))),
                    _place(first, mesh), jax.random.key(0), params, max_new_tokens=6, mesh=mesh)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-4)


_COLLECTIVE = re.compile(
    r"=\s*(.+?)\s+(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(-start)?\("
)


def collectives(hlo: str):
    """``(op, dims)`` of every collective in compiled HLO text (tuple results give several)."""
    found = []
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if m:
            for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", m.group(1)):
                found.append((m.group(2), tuple(int(d) for d in dims.split(",") if d)))
    return found


def test_collectives_parser_sees_a_full_vocabulary_gather():
    # The HLO check below can fail: gathering the logits shows up with the vocabulary size.
    mesh = _mesh((2, 4))
    gather = jax.shard_map(
        lambda x: lax.all_gather(x, "model", axis=1, tiled=True),
        mesh=mesh, in_specs=P("data", "model"), out_specs=P("data"), check_vma=False,
    )
    hlo = jax.jit(gather).lower(_place(jnp.zeros((B, V)), mesh)).compile().as_text()
    assert ("all-gather", (B // 2, V)) in collectives(hlo)


@pytest.mark.parametrize("shape", [(1, 8), (2, 4)], ids=lambda s: f"mesh{s[0]}x{s[1]}")
def test_compiled_hlo_moves_no_vocabulary_sized_array(shape):
    mesh = _mesh(shape)
    params = _params()
    x = _place(_family("normal", seed=0), mesh)
    fn = jax.jit(lambda key, logits: js.sample_sharded(key, logits, params, mesh=mesh))
    compiled = fn.lower(jax.random.key(0), x).compile()
    found = collectives(compiled.as_text())
    assert {"all-gather", "all-reduce"} <= {op for op, _ in found}  # pool, row statistics
    rows = B // shape[0]
    for op, dims in found:
        # No full-vocabulary dimension, and nothing near it in size: the largest exchange is
        # the candidate pool (8 shards x 64 candidates = an eighth of this vocabulary).
        assert V not in dims and math.prod(dims) <= rows * V // 4, (op, dims)
    # The same program, inside a caller's jit: the unsharded tokens, sharded over the batch.
    tokens = compiled(jax.random.key(3), x)
    np.testing.assert_array_equal(tokens, js.sample(jax.random.key(3), _family("normal", 0), params))
    assert tokens.sharding.spec == P("data")


class TestErrors:
    @pytest.fixture(autouse=True)
    def setup(self):
        self.mesh = _mesh((2, 4))
        self.x = jnp.zeros((B, V))

    def call(self, x=None, key=None, params=None, **kwargs):
        kwargs.setdefault("mesh", self.mesh)
        return js.sample_sharded(jax.random.key(0) if key is None else key,
                                 self.x if x is None else x, params, **kwargs)

    def test_mesh_must_be_a_mesh(self):
        with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
            self.call(mesh=jax.devices())

    def test_unknown_axis_is_named(self):
        with pytest.raises(ValueError, match=r"vocab_axis='tp' is not an axis of the mesh"):
            self.call(vocab_axis="tp")
        with pytest.raises(ValueError, match=r"batch_axis='dp'"):
            self.call(batch_axis="dp")
        with pytest.raises(TypeError, match="vocab_axis must be a mesh axis name"):
            self.call(vocab_axis=3)

    def test_one_axis_cannot_split_both_dimensions(self):
        with pytest.raises(ValueError, match="both use mesh axis 'model'"):
            self.call(batch_axis=("data", "model"))

    def test_sizes_must_divide(self):
        with pytest.raises(ValueError, match=r"vocabulary size 4094 .* 4 devices along vocab_axis"):
            self.call(x=jnp.zeros((B, V - 2)))
        with pytest.raises(ValueError, match=r"batch size 3 .* 2 devices along batch_axis"):
            self.call(x=jnp.zeros((3, V)))

    def test_logits_must_be_two_dimensional(self):
        with pytest.raises(ValueError, match=r"shape \[batch, vocab\]"):
            self.call(x=jnp.zeros((2, B, V)))

    def test_key_and_params_are_checked(self):
        with pytest.raises(ValueError, match="one key per row"):
            self.call(key=jax.random.split(jax.random.key(0), 3))
        with pytest.raises(ValueError, match="SamplingParams.top_k has shape"):
            self.call(params=js.SamplingParams(top_k=np.ones(3, np.int32)))
        with pytest.raises(TypeError, match="params must be a jsample.SamplingParams"):
            self.call(params={"top_k": 3})
