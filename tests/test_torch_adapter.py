"""jsample.torch: DLPack round trips without copies, torch dtypes and devices, torch seeding, errors."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jsample as js
import jsample.torch as jt
from jsample.reference import inclusive_probs, inverse_cdf

BATCH, VOCAB = 6, 97
PARAMS = js.SamplingParams(temperature=0.8, top_k=20, top_p=0.9)


@pytest.fixture(scope="module")
def logits():
    # bf16-representable values, so the f32, bf16 and f16 copies hold the same numbers.
    x = torch.randn(BATCH, VOCAB, generator=torch.Generator().manual_seed(0)) * 2
    return x.to(torch.bfloat16).float()


def test_importing_jsample_does_not_import_torch():
    code = "import sys, jsample; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- DLPack -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_to_jax_shares_memory_and_from_jax_shares_it_back(dtype):
    t = torch.randn(4, VOCAB).to(dtype)
    a = jt.to_jax(t)
    assert a.dtype == jnp.dtype(str(dtype).removeprefix("torch."))
    assert a.unsafe_buffer_pointer() == t.data_ptr()
    back = jt.from_jax(a)
    assert back.data_ptr() == t.data_ptr() and back.dtype == dtype and torch.equal(back, t)


def test_writes_to_the_tensor_are_seen_by_the_jax_array():
    t = torch.zeros(3, 5)
    a = jt.to_jax(t)
    t[1, 2] = 7.0
    assert float(a[1, 2]) == 7.0


def test_from_jax_does_not_copy():
    a = jnp.arange(12, dtype=jnp.float32).reshape(3, 4) * 2
    t = jt.from_jax(a)
    assert t.data_ptr() == a.unsafe_buffer_pointer()
    np.testing.assert_array_equal(t.cpu().numpy(), np.asarray(a))  # on a GPU, t is on CUDA


def test_to_jax_copies_only_what_dlpack_cannot_share():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    strided = base[:, ::2]
    np.testing.assert_array_equal(np.asarray(jt.to_jax(strided)), strided.numpy())
    with_grad = base.clone().requires_grad_()
    np.testing.assert_array_equal(np.asarray(jt.to_jax(with_grad)), base.numpy())


def test_from_jax_rejects_tracers_sharded_arrays_and_non_arrays():
    with pytest.raises(TypeError, match="jax.Array"):
        jt.from_jax(np.zeros(3))
    with pytest.raises(TypeError, match="outside jax.jit"):
        jax.jit(jt.from_jax)(jnp.zeros(3))
    devices = jax.devices()
    if len(devices) < 2:
        pytest.skip("needs two devices")
    mesh = jax.sharding.Mesh(np.array(devices[:2]), ("rows",))
    sharded = jax.device_put(jnp.zeros((4, 3)), jax.NamedSharding(mesh, jax.P("rows")))
    with pytest.raises(ValueError, match="sharded over 2 devices"):
        jt.from_jax(sharded)


# --- Sampling through the adapter -------------------------------------------------------------


def test_sample_returns_int64_tokens_on_the_input_device(logits):
    tokens, logprobs = jt.sample(logits, PARAMS, torch.Generator().manual_seed(1), return_logprobs=True)
    assert tokens.dtype == torch.int64 and tokens.shape == (BATCH,) and tokens.device == logits.device
    assert logprobs.dtype == torch.float32 and logprobs.shape == (BATCH,)
    p = jt.probs(logits, PARAMS)
    assert p.dtype == torch.float32 and p.shape == logits.shape and p.device == logits.device
    assert torch.all(p[torch.arange(BATCH), tokens] > 0)
    torch.testing.assert_close(logprobs, p[torch.arange(BATCH), tokens].log(), atol=1e-5, rtol=0)
    torch.testing.assert_close(jt.log_probs(logits, PARAMS).exp(), p, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_sample_like_float32(logits, dtype):
    """The values are the same in every dtype and the math is float32, so the tokens are too."""
    seed = lambda: torch.Generator().manual_seed(2)
    assert torch.equal(jt.sample(logits.to(dtype), PARAMS, seed()), jt.sample(logits, PARAMS, seed()))
    torch.testing.assert_close(jt.probs(logits.to(dtype), PARAMS), jt.probs(logits, PARAMS))


def test_probs_match_the_jax_api_and_the_reference(logits):
    p = jt.probs(logits, PARAMS)
    # The JAX API on the device the adapter uses (the CPU's, for a CPU tensor): another device's
    # exp and sums may round differently.
    np.testing.assert_array_equal(p.numpy(), np.asarray(js.probs(jt.to_jax(logits), PARAMS)))
    reference = inclusive_probs(logits, 0.8, 20, 0.9)
    assert (p - reference).abs().max() <= 2e-5


def test_manual_seed_makes_sample_reproducible(logits):
    torch.manual_seed(123)
    first = jt.sample(logits)
    second = jt.sample(logits)  # the default generator has advanced
    torch.manual_seed(123)
    assert torch.equal(jt.sample(logits), first)
    assert not torch.equal(first, second)
    torch.manual_seed(124)
    assert not torch.equal(jt.sample(logits), first)


def test_generator_becomes_a_key_from_two_32_bit_draws(logits):
    """The documented conversion: torch.randint(0, 2**32, (2,)) -> threefry2x32 key data."""
    gen = torch.Generator().manual_seed(5)
    tokens = jt.sample(logits, PARAMS, gen)
    gen.manual_seed(5)
    words = torch.randint(0, 2**32, (2,), dtype=torch.int64, generator=gen).numpy().astype(np.uint32)
    key = jax.random.wrap_key_data(words, impl="threefry2x32")
    expected = js.sample(key, jnp.asarray(logits.numpy()), PARAMS)
    np.testing.assert_array_equal(tokens.numpy(), np.asarray(expected))
    # An explicit generator leaves the default one alone.
    torch.manual_seed(9)
    before = torch.rand(())
    torch.manual_seed(9)
    jt.sample(logits, PARAMS, torch.Generator().manual_seed(0))
    assert torch.equal(torch.rand(()), before)


def test_per_row_params_may_be_torch_tensors(logits):
    as_torch = js.SamplingParams(
        temperature=torch.linspace(0.5, 1.5, BATCH, dtype=torch.bfloat16),
        top_k=torch.tensor([0, 1, 5, 20, 97, 3]),
        top_p=torch.tensor([1.0, 0.5, 0.9, 0.3, 0.7, 0.0]),
        min_p=torch.tensor(0.05),
    )
    as_numpy = js.SamplingParams(
        temperature=torch.linspace(0.5, 1.5, BATCH, dtype=torch.bfloat16).float().numpy(),
        top_k=np.array([0, 1, 5, 20, 97, 3]),
        top_p=np.array([1.0, 0.5, 0.9, 0.3, 0.7, 0.0], np.float32),
        min_p=0.05,
    )
    torch.testing.assert_close(jt.probs(logits, as_torch), jt.probs(logits, as_numpy), atol=0, rtol=0)
    seed = lambda: torch.Generator().manual_seed(3)
    assert torch.equal(jt.sample(logits, as_torch, seed()), jt.sample(logits, as_numpy, seed()))


def test_sample_from_uniform_is_the_first_index_whose_cumulative_probability_exceeds_u():
    # Cumulative probabilities 0.5, 0.75, 1.0 (then removed tokens, padded to the shared shape):
    # u on a boundary moves to the next token.
    logits = torch.full((BATCH, VOCAB), -torch.inf)
    logits[:, :3] = torch.tensor([0.5, 0.25, 0.25]).log()
    u = torch.tensor([0.0, 0.4999, 0.5, 0.7, 0.75, 0.999])
    tokens = jt.sample_from_uniform(u, logits)
    assert tokens.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(tokens, inverse_cdf(logits.softmax(-1), u))
    assert tokens.tolist() == js.sample_from_uniform(jnp.asarray(u.numpy()), jnp.asarray(logits.numpy())).tolist()


def test_sample_from_uniform_replays_the_inverse_cdf_of_the_reference(logits):
    u = torch.rand(BATCH, generator=torch.Generator().manual_seed(4))
    tokens = jt.sample_from_uniform(u, logits, PARAMS)
    assert torch.equal(tokens, inverse_cdf(inclusive_probs(logits, 0.8, 20, 0.9), u))


# --- Errors -----------------------------------------------------------------------------------


def test_errors_name_the_problem(logits):
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        jt.sample(logits.numpy(), PARAMS)
    with pytest.raises(TypeError, match="floating point"):
        jt.sample(torch.ones(2, 5, dtype=torch.int64), PARAMS)
    with pytest.raises(TypeError, match="floating point"):
        jt.probs(torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"shape \[..., vocab\]"):
        jt.sample(torch.tensor(1.0))
    with pytest.raises(ValueError, match="vocab > 0"):
        jt.log_probs(torch.zeros(3, 0))
    with pytest.raises(TypeError, match="torch.Generator"):
        jt.sample(logits, PARAMS, generator=0)
    with pytest.raises(TypeError, match="SamplingParams"):
        jt.sample(logits, {"top_k": 5})
    with pytest.raises(ValueError, match="top_k"):
        jt.probs(logits, js.SamplingParams(top_k=torch.tensor([1, 2, 3])))
    with pytest.raises(ValueError, match="top_p"):
        jt.probs(logits, js.SamplingParams(top_p=torch.full((BATCH,), 1.5)))
    with pytest.raises(TypeError, match="u must be a torch.Tensor"):
        jt.sample_from_uniform(np.zeros(BATCH), logits)
    with pytest.raises(TypeError, match="tensor must be a torch.Tensor"):
        jt.to_jax([1.0, 2.0])
    with pytest.raises(ValueError, match="no backend"):
        jt.to_jax(torch.zeros(3, device="meta"))
