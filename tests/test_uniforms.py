"""The sampler's uniforms are ``jax.random.uniform``'s, bit for bit, for every kind of key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsample as js
from jsample import uniforms

_one_key = jax.jit(uniforms.uniform, static_argnums=1)
_per_key = jax.jit(uniforms.uniform_per_key)


@pytest.mark.parametrize("rows", [1, 7, 64, 1000])
def test_one_key_gives_jax_random_uniform(rows):
    for seed in (0, 1, 42, 2**31 - 1):
        key = jax.random.key(seed)
        expected = jax.random.uniform(key, (rows,), jnp.float32)
        assert np.array_equal(_one_key(key, rows), expected)


def test_per_row_keys_give_jax_random_uniform_of_each():
    keys = jax.random.split(jax.random.key(3), 257)
    expected = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)
    got = np.asarray(_per_key(keys))
    assert np.array_equal(got, expected)
    # Not degenerate: spread over [0, 1).
    assert 0.0 <= got.min() < 0.05 and 0.95 < got.max() < 1.0


def test_the_hash_matches_the_published_test_vector():
    # Threefry-2x32, 20 rounds, key and counter all ones (Random123's kat_vectors).
    ones = jnp.uint32(0xFFFFFFFF)
    x0, x1 = uniforms.threefry2x32(ones, ones, ones, ones)
    assert (int(x0), int(x1)) == (0x1CB996FC, 0xBB002BE7)


def test_other_generators_and_bit_layouts_go_to_jax():
    key = jax.random.key(5, impl="rbg")
    assert np.array_equal(uniforms.uniform(key, 9), jax.random.uniform(key, (9,)))
    with jax.threefry_partitionable(False):
        key = jax.random.key(5)
        assert np.array_equal(uniforms.uniform(key, 9), jax.random.uniform(key, (9,)))
        keys = jax.random.split(key, 4)
        expected = jax.vmap(lambda k: jax.random.uniform(k, ()))(keys)
        assert np.array_equal(uniforms.uniform_per_key(keys), expected)


def test_legacy_keys_sample_as_typed_keys():
    logits = jnp.asarray(np.random.default_rng(0).normal(0, 2, (5, 50)), jnp.float32)
    params = js.SamplingParams(temperature=0.8, top_p=0.95)
    typed = js.sample(jax.random.key(11), logits, params)
    legacy = js.sample(jax.random.PRNGKey(11), logits, params)
    assert np.array_equal(typed, legacy)
    u = jax.random.uniform(jax.random.PRNGKey(11), (5,))
    assert np.array_equal(legacy, js.sample_from_uniform(u, logits, params))
