"""Text in, text out: byte encoding, a :func:`jsample.decode` step function, and ``generate``."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jsample.decode import DecodeResult, decode
from jsample.model.transformer import Cache, Transformer
from jsample.params import SamplingParams

NEWLINE = ord("\n")


def encode(prompts: Sequence[str], width: int) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 bytes of each prompt, right-padded with 0 to ``width``.

    Every batch has the same ``[B, width]`` shape, so prompts of any length share one compiled
    prefill. An empty prompt reads as a single newline (the model has no start token).

    Returns:
      ``(tokens int32 [B, width], lengths int32 [B])``.

    Example:
      >>> from jsample.model import encode
      >>> tokens, lengths = encode(["Hi", "é"], width=4)
      >>> tokens.tolist(), lengths.tolist()
      ([[72, 105, 0, 0], [195, 169, 0, 0]], [2, 2])
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, got one str; wrap it in a list.")
    encoded = [p.encode("utf-8") or b"\n" for p in prompts]
    for p in encoded:
        if len(p) > width:
            raise ValueError(f"a prompt is {len(p)} bytes long; the model reads at most {width}.")
    tokens = np.zeros((len(encoded), width), np.int32)
    for row, p in enumerate(encoded):
        tokens[row, : len(p)] = np.frombuffer(p, np.uint8)
    return tokens, np.array([len(p) for p in encoded], np.int32)


def to_text(tokens: Any, lengths: Any) -> list[str]:
    """Row ``b``'s first ``lengths[b]`` bytes as text (invalid UTF-8 becomes U+FFFD)."""
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    return [bytes(row[:n].astype(np.uint8)).decode("utf-8", errors="replace")
            for row, n in zip(tokens, lengths)]


@dataclasses.dataclass(frozen=True)
class ModelStep:
    """The ``step_fn`` of a :class:`Transformer` for :func:`jsample.decode`.

    Its state is ``(weights, cache)``, with ``graphdef, weights = nnx.split(model)``; the weights
    ride along unchanged so they are data of the compiled loop, not constants. Two instances
    with equal graph definitions compare equal, so :func:`jsample.decode` compiles once per model
    architecture, not once per call.
    """

    graphdef: nnx.GraphDef

    def __call__(self, state: tuple[nnx.State, Cache], tokens: jax.Array):
        weights, cache = state
        logits, cache = nnx.merge(self.graphdef, weights).step(cache, tokens)
        return logits, (weights, cache)


@functools.partial(jax.jit, static_argnums=0)
def _prefill(graphdef, weights, tokens, lengths):
    return nnx.merge(graphdef, weights).prefill(tokens, lengths)


def prefill(model: Transformer, prompts: Sequence[str]) -> tuple[ModelStep, Any, jax.Array]:
    """Reads ``prompts``; returns ``(step_fn, state, logits)`` for :func:`jsample.decode`.

    Example:
      >>> import jax, jsample as js
      >>> from jsample.model import load, prefill, to_text
      >>> step, state, logits = prefill(load(), ["A list is", "Tuples"])
      >>> out = js.decode(step, state, logits, jax.random.key(0), max_new_tokens=40,
      ...                 eos_id=ord(" "))
      >>> [text.endswith(" ") for text in to_text(out.tokens, out.lengths)]
      [True, True]
    """
    tokens, lengths = encode(prompts, model.config.window)
    graphdef, weights = nnx.split(model)
    logits, cache = _prefill(graphdef, weights, jnp.asarray(tokens), jnp.asarray(lengths))
    return ModelStep(graphdef), (weights, cache), logits


def generate(
    model: Transformer,
    prompts: Sequence[str],
    key: jax.Array,
    params: SamplingParams | None = None,
    *,
    max_new_tokens: int = 200,
    eos_id: int | None = None,
) -> tuple[list[str], DecodeResult]:
    """Continues each prompt: :func:`prefill`, then :func:`jsample.decode`.

    Args:
      model: a :class:`Transformer`, e.g. :func:`jsample.model.load`.
      prompts: ``B`` strings, each at most ``model.config.window`` UTF-8 bytes.
      key: one PRNG key (row ``b`` uses ``fold_in(key, b)``) or ``B`` keys.
      params: sampling parameters, scalars or one value per prompt.
      max_new_tokens: bytes generated per prompt at most.
      eos_id: a byte that ends a row (e.g. ``ord("\\n")``), or ``None``.

    Returns:
      ``(texts, result)``: the ``B`` continuations as text, and the :class:`DecodeResult`.

    Example:
      >>> import jax, jsample as js
      >>> from jsample.model import generate, load
      >>> texts, out = generate(load(), ["The ", "The "], jax.random.key(0),
      ...                       js.SamplingParams(temperature=0.0), max_new_tokens=8)
      >>> texts[0] == texts[1], out.lengths.tolist()
      (True, [8, 8])
    """
    step, state, logits = prefill(model, prompts)
    result = decode(step, state, logits, key, params, max_new_tokens=max_new_tokens, eos_id=eos_id)
    return to_text(result.tokens, result.lengths), result
