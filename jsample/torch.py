"""PyTorch interop: torch logits in, torch tokens and probabilities out.

The tensors cross to JAX through DLPack, so a contiguous CPU (or, with a CUDA build of JAX,
CUDA) tensor is shared with JAX rather than copied, and results come back the same way. The
sampling itself is :func:`jsample.sample`, with the same parameters and the same guarantees.

Randomness follows torch's conventions. Each call to :func:`sample` draws two 32-bit words from
``generator`` (``torch.randint(0, 2**32, (2,), generator=generator)``), or from torch's default
generator for the logits' device when ``generator`` is ``None``, and uses them as the data of a
``threefry2x32`` JAX key (:func:`key_from_generator`). So ``torch.manual_seed(s)`` makes the
tokens reproducible exactly as it makes ``torch.multinomial`` reproducible, and each call
advances the generator. The tokens are not the ones ``torch.multinomial`` would draw (the random
streams differ); to replay a torch inverse-CDF run token for token, pass its uniforms to
:func:`sample_from_uniform`.

Importing this module imports torch; ``import jsample`` alone does not.

Example:
  >>> import torch, jsample as js, jsample.torch as jt
  >>> logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 3.0, 0.1, 0.2]])
  >>> params = js.SamplingParams(temperature=0.7, top_k=2, top_p=0.9)
  >>> _ = torch.manual_seed(0)
  >>> first = jt.sample(logits, params)
  >>> _ = torch.manual_seed(0)
  >>> bool(torch.equal(first, jt.sample(logits, params))), first.dtype
  (True, torch.int64)
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import torch

from jsample import sampling, validation
from jsample.params import FIELD_DTYPES, SamplingParams

__all__ = [
    "from_jax",
    "key_from_generator",
    "log_probs",
    "probs",
    "sample",
    "sample_from_uniform",
    "to_jax",
]


def _check_tensor(value: Any, fn: str, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{fn}: {name} must be a torch.Tensor, got {type(value).__name__}. "
            "For NumPy or JAX arrays call the jsample functions directly."
        )
    return value


def _check_device(tensor: torch.Tensor, fn: str) -> None:
    if tensor.device.type == "cpu":
        return
    if tensor.device.type == "cuda":
        try:
            jax.devices("cuda")
            return
        except RuntimeError:
            pass
    raise ValueError(
        f"{fn}: JAX has no backend for a tensor on {tensor.device} (JAX devices: "
        f"{jax.devices()}). Move it with tensor.cpu(), or install a JAX build for that device."
    )


def to_jax(tensor: torch.Tensor) -> jax.Array:
    """A JAX array holding ``tensor``'s values, through DLPack.

    A contiguous tensor is shared, not copied: JAX reads the same memory, so writing to the
    tensor afterwards changes the array. Torch's CPU allocator returns 64-byte aligned memory,
    which JAX's CPU backend needs to share a buffer; a view whose data starts elsewhere (e.g.
    ``t[1:]``) is copied by JAX. A non-contiguous tensor is made contiguous first (one copy).
    The tensor is detached from autograd. Dtypes follow JAX's rules: with 64-bit mode off,
    float64 and int64 tensors arrive as float32 and int32 copies.

    Args:
      tensor: a ``torch.Tensor`` on the CPU, or on a CUDA device when JAX has a CUDA backend.

    Returns:
      a ``jax.Array`` with the tensor's shape, on the matching JAX device.

    Example:
      >>> import torch, jsample.torch as jt
      >>> t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
      >>> a = jt.to_jax(t)
      >>> a.shape, a.unsafe_buffer_pointer() == t.data_ptr()
      ((2, 3), True)
    """
    _check_tensor(tensor, "jsample.torch.to_jax", "tensor")
    _check_device(tensor, "jsample.torch.to_jax")
    tensor = tensor.detach()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return jax.dlpack.from_dlpack(tensor)


def from_jax(array: jax.Array) -> torch.Tensor:
    """A torch tensor sharing ``array``'s memory, through DLPack (no copy).

    JAX arrays are immutable and other JAX arrays may alias the same buffer, so treat the
    tensor as read-only, or ``clone()`` it before writing to it in place.

    Args:
      array: a ``jax.Array`` on a single device, outside ``jit`` (not a tracer).

    Returns:
      a ``torch.Tensor`` with the array's shape and dtype, on the matching torch device.

    Example:
      >>> import jax.numpy as jnp, jsample.torch as jt
      >>> a = jnp.arange(3, dtype=jnp.int32)
      >>> t = jt.from_jax(a)
      >>> t.tolist(), t.data_ptr() == a.unsafe_buffer_pointer()
      ([0, 1, 2], True)
    """
    if isinstance(array, jax.core.Tracer):
        raise TypeError("jsample.torch.from_jax: got a traced value; call it outside jax.jit.")
    if not isinstance(array, jax.Array):
        raise TypeError(f"jsample.torch.from_jax: array must be a jax.Array, got {type(array).__name__}.")
    if len(array.devices()) != 1:
        raise ValueError(
            f"jsample.torch.from_jax: array is sharded over {len(array.devices())} devices; "
            "DLPack exports one device's buffer. Gather it first (e.g. jax.device_put(array, device))."
        )
    return torch.from_dlpack(array)


def key_from_generator(generator: torch.Generator | None = None, *,
                       device: torch.device | str = "cpu") -> jax.Array:
    """A JAX PRNG key made from 64 random bits drawn from a torch generator.

    Draws ``torch.randint(0, 2**32, (2,), generator=generator)`` (advancing the generator) and
    wraps the two words as ``threefry2x32`` key data, whatever JAX's default PRNG is.

    Args:
      generator: a ``torch.Generator``; ``None`` uses torch's default generator for ``device``
        (the one ``torch.manual_seed`` seeds).
      device: the device whose default generator is used when ``generator`` is ``None``.

    Returns:
      a typed JAX key (``jax.random.key``-style, shape ``()``).

    Example:
      >>> import torch, jax, jsample.torch as jt
      >>> a = jt.key_from_generator(torch.Generator().manual_seed(1))
      >>> b = jt.key_from_generator(torch.Generator().manual_seed(1))
      >>> bool((jax.random.key_data(a) == jax.random.key_data(b)).all())
      True
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}."
        )
    source = generator.device if generator is not None else torch.device(device)
    words = torch.randint(0, 2**32, (2,), dtype=torch.int64, generator=generator, device=source)
    return jax.random.wrap_key_data(words.cpu().numpy().astype(np.uint32), impl="threefry2x32")


def _logits(logits: Any, fn: str) -> jax.Array:
    _check_tensor(logits, fn, "logits")
    if not logits.is_floating_point():
        raise TypeError(
            f"{fn}: logits must be floating point (float32, bfloat16 or float16), got "
            f"{logits.dtype}. Cast with logits.float()."
        )
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"{fn}: logits must have shape [..., vocab] with vocab > 0, got "
                         f"{tuple(logits.shape)}.")
    return to_jax(logits)


def _params(params: Any) -> SamplingParams | None:
    """``params`` with any torch tensor fields turned into NumPy arrays (and checked again)."""
    if params is None:
        return None
    validation.check_params(params)
    updates = {}
    for name in FIELD_DTYPES:
        value = getattr(params, name)
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            # NumPy has no bfloat16; float32 holds every bf16/f16 value exactly.
            updates[name] = (value.float() if value.is_floating_point() else value).numpy()
    return params.replace(**updates) if updates else params


def _to_device(array: jax.Array, device: torch.device, dtype: torch.dtype | None = None):
    return from_jax(array).to(device=device, dtype=dtype)


def sample(logits: torch.Tensor, params: SamplingParams | None = None,
           generator: torch.Generator | None = None, *, return_logprobs: bool = False):
    """Samples one token per row of torch ``logits`` with :func:`jsample.sample`.

    Args:
      logits: float ``[..., vocab]`` tensor (float32, bfloat16 or float16; math is in float32).
      params: a :class:`jsample.SamplingParams`; its fields may be torch tensors of one value per
        row. ``None`` samples from ``softmax(logits)``.
      generator: a ``torch.Generator``; ``None`` uses torch's default generator for the logits'
        device. See the module docstring for how it becomes a JAX key.
      return_logprobs: also return each token's log-probability under :func:`probs`.

    Returns:
      int64 ``[...]`` tokens on ``logits.device``, or ``(tokens, logprobs)`` with float32
      ``[...]`` logprobs.

    Example:
      >>> import torch, jsample as js, jsample.torch as jt
      >>> logits = torch.tensor([[0.0, 5.0, 1.0], [4.0, 0.0, 0.0]])
      >>> jt.sample(logits, js.SamplingParams(top_k=1), torch.Generator().manual_seed(0)).tolist()
      [1, 0]
    """
    x = _logits(logits, "jsample.torch.sample")
    key = key_from_generator(generator, device=logits.device)
    out = sampling.sample(key, x, _params(params), return_logprobs=return_logprobs)
    if return_logprobs:
        tokens, logprobs = out
        return _to_device(tokens, logits.device, torch.int64), _to_device(logprobs, logits.device)
    return _to_device(out, logits.device, torch.int64)


def sample_from_uniform(u: torch.Tensor, logits: torch.Tensor, params: SamplingParams | None = None,
                        *, return_logprobs: bool = False):
    """Inverse-CDF tokens for given uniforms, with :func:`jsample.sample_from_uniform`.

    With ``u = torch.rand(batch)`` this picks, row by row, the token that
    :func:`jsample.reference.inverse_cdf` picks from the same distribution (up to float rounding
    at a boundary), which replays a torch inverse-CDF run token for token.

    Args:
      u: float tensor ``[...]`` in ``[0, 1)``, one per row of ``logits``.
      logits: float ``[..., vocab]`` tensor.
      params: as in :func:`sample`.
      return_logprobs: also return each token's log-probability.

    Returns:
      int64 ``[...]`` tokens on ``logits.device`` (and float32 logprobs if asked).

    Example:
      >>> import torch, jsample.torch as jt
      >>> logits = torch.tensor([0.5, 0.25, 0.25]).log().expand(3, 3)
      >>> jt.sample_from_uniform(torch.tensor([0.1, 0.6, 0.9]), logits).tolist()
      [0, 1, 2]
    """
    fn = "jsample.torch.sample_from_uniform"
    x = _logits(logits, fn)
    _check_tensor(u, fn, "u")
    u = to_jax(u.float())
    out = sampling.sample_from_uniform(u, x, _params(params), return_logprobs=return_logprobs)
    if return_logprobs:
        tokens, logprobs = out
        return _to_device(tokens, logits.device, torch.int64), _to_device(logprobs, logits.device)
    return _to_device(out, logits.device, torch.int64)


def probs(logits: torch.Tensor, params: SamplingParams | None = None) -> torch.Tensor:
    """float32 ``[..., vocab]`` tensor on ``logits.device``: :func:`jsample.probs` of torch logits.

    Example:
      >>> import torch, jsample as js, jsample.torch as jt
      >>> logits = torch.tensor([0.5, 0.25, 0.125, 0.125]).log()
      >>> p = jt.probs(logits, js.SamplingParams(top_p=0.6, top_p_rule="exclusive"))
      >>> p.tolist()
      [1.0, 0.0, 0.0, 0.0]
    """
    x = _logits(logits, "jsample.torch.probs")
    return _to_device(sampling.probs(x, _params(params)), logits.device)


def log_probs(logits: torch.Tensor, params: SamplingParams | None = None) -> torch.Tensor:
    """float32 ``[..., vocab]`` tensor: :func:`jsample.log_probs` of torch logits (``-inf`` removed).

    Example:
      >>> import torch, jsample as js, jsample.torch as jt
      >>> lp = jt.log_probs(torch.tensor([1.0, 2.0, 3.0]), js.SamplingParams(top_k=2))
      >>> bool(torch.isneginf(lp[0]))
      True
    """
    x = _logits(logits, "jsample.torch.log_probs")
    return _to_device(sampling.log_probs(x, _params(params)), logits.device)
