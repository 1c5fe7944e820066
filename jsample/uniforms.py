"""The draw's uniforms from PRNG keys: the bits of ``jax.random.uniform``, hashed without a loop.

On the CPU, JAX lowers its threefry hash as a ``fori_loop`` of five rounds, and XLA:CPU runs
each trip as a dozen small thunks (copies of the loop state among them), about 85 per call for
64 numbers. Taking the uniforms away altogether took 0.1 to 0.25 ms off a call at B=64; this
module's hash took 0.05 ms off top-k 50 + top-p 0.9 and 0.07 ms off temperature sampling
(in-process A/Bs, paired medians, 2026-11-23).
:func:`uniform` computes the same Threefry-2x32 hash (Salmon et al., "Parallel random numbers:
as easy as 1, 2, 3", SC 2011; 20 rounds) as straight-line elementwise code, which XLA fuses
into one loop, and turns the bits into floats as ``jax.random.uniform`` does. The result is
bit for bit ``jax.random.uniform(key, shape)`` (a test checks it); keys of other generators,
and JAX's older non-partitionable threefry bit layout, go to ``jax.random.uniform`` itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_U32 = jnp.uint32
# Threefry-2x32 rotation distances: two sets of four, alternating every four rounds.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
# The key schedule's parity constant (Threefish's C240, 32-bit form).
_PARITY = 0x1BD11BDA


def _rotate_left(v: jax.Array, bits: int) -> jax.Array:
    return (v << _U32(bits)) | (v >> _U32(32 - bits))


def threefry2x32(k0: jax.Array, k1: jax.Array, x0: jax.Array, x1: jax.Array):
    """Threefry-2x32 with 20 rounds of the counter pair ``(x0, x1)`` under key ``(k0, k1)``.

    All uint32, broadcast against each other. Unrolled: five blocks of four rounds, each block
    followed by the injection of the next key word pair and the block number.
    """
    keys = (k0, k1, k0 ^ k1 ^ _U32(_PARITY))
    x0, x1 = x0 + keys[0], x1 + keys[1]
    for block in range(5):
        for r in _ROTATIONS[block % 2]:
            x0 = x0 + x1
            x1 = _rotate_left(x1, r) ^ x0
        x0 = x0 + keys[(block + 1) % 3]
        x1 = x1 + keys[(block + 2) % 3] + _U32(block + 1)
    return x0, x1


def _is_threefry(key: jax.Array) -> bool:
    return str(jax.random.key_impl(key)) == "threefry2x32" and jax.config.jax_threefry_partitionable


def uniform(key: jax.Array, rows: int) -> jax.Array:
    """float32 ``[rows]``: ``jax.random.uniform(key, (rows,))`` for one typed key."""
    if not _is_threefry(key) or rows >= 2**32:  # beyond 2**32 the high counter word counts too
        return jax.random.uniform(key, (rows,), jnp.float32)
    k0, k1 = jax.random.key_data(key)
    # The counters of element i are (i // 2**32, i % 2**32), as jax.random's iota_2x32_shape.
    counter = jnp.arange(rows, dtype=_U32)
    return _to_unit(*threefry2x32(k0, k1, jnp.zeros_like(counter), counter))


def uniform_per_key(keys: jax.Array) -> jax.Array:
    """float32 ``[n]``: ``jax.random.uniform(keys[i], ())`` for a ``[n]`` array of typed keys."""
    if not _is_threefry(keys):
        return jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)
    data = jax.random.key_data(keys)
    zero = jnp.zeros(keys.shape, _U32)
    return _to_unit(*threefry2x32(data[:, 0], data[:, 1], zero, zero))


def _to_unit(b0: jax.Array, b1: jax.Array) -> jax.Array:
    """Hash words -> floats in [0, 1): 23 random mantissa bits under the exponent of 1.0, less 1."""
    bits = ((b0 ^ b1) >> _U32(9)) | _U32(0x3F800000)
    return jnp.maximum(0.0, lax.bitcast_convert_type(bits, jnp.float32) - 1.0)
