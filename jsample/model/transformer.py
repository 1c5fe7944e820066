"""A small byte-level decoder-only transformer in Flax NNX, with a ring-buffer KV cache.

Pre-norm blocks (RMSNorm, multi-head attention with rotary position embeddings, a GELU MLP) and
an output head tied to the token embedding. Rotary embeddings make attention depend only on the
distance between positions, so at inference the cache is a ring of the last ``window`` positions
and generation can run past the training context: every query sees at most ``window`` keys, the
same as in training.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Config:
    """Shape of a :class:`Transformer`.

    Attributes:
      vocab: tokens; 256 for bytes.
      dim: width of the residual stream.
      heads: attention heads; ``dim`` must be divisible by ``heads``.
      layers: transformer blocks.
      hidden: width of each MLP.
      window: attention span: the training context and the KV-cache length.
    """

    vocab: int = 256
    dim: int = 128
    heads: int = 4
    layers: int = 3
    hidden: int = 384
    window: int = 128

    def __post_init__(self):
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(
                f"Config: dim ({self.dim}) must split into {self.heads} heads of even size."
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


class Cache(NamedTuple):
    """Keys and values of the last ``window`` positions of every row, and each row's length.

    Position ``t`` of a row lives in slot ``t % window``; keys are stored already rotated.
    """

    keys: jax.Array  # [layers, B, window, heads, head_dim] float32
    values: jax.Array  # [layers, B, window, heads, head_dim] float32
    length: jax.Array  # [B] int32: positions written so far; the next token goes at this position


def _rotate(x: jax.Array, positions: jax.Array) -> jax.Array:
    """Rotary position embedding (Su et al., 2021, arXiv:2104.09864).

    ``x`` ``[B, T, heads, head_dim]``, ``positions`` int ``[B, T]``.
    """
    half = x.shape[-1] // 2
    freq = 10000.0 ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions[..., None, None].astype(jnp.float32) * freq  # [B, T, 1, half]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    a, b = x[..., :half], x[..., half:]
    return jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
    """``q`` ``[B, T, H, D]``, ``k``/``v`` ``[B, S, H, D]``, ``visible`` bool ``[B, T, S]``."""
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    scores = jnp.where(visible[:, None], scores, -jnp.inf)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)


class Block(nnx.Module):
    """One pre-norm transformer block."""

    def __init__(self, config: Config, *, rngs: nnx.Rngs):
        dim, init = config.dim, nnx.initializers.normal(0.02)
        self.heads = config.heads
        self.attn_norm = nnx.RMSNorm(dim, rngs=rngs)
        self.qkv = nnx.Linear(dim, 3 * dim, use_bias=False, kernel_init=init, rngs=rngs)
        # Residual projections start small (GPT-2's 1/sqrt(2 * layers)) so deep stacks train stably.
        out_init = nnx.initializers.normal(0.02 / math.sqrt(2 * config.layers))
        self.out = nnx.Linear(dim, dim, use_bias=False, kernel_init=out_init, rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(dim, rngs=rngs)
        self.up = nnx.Linear(dim, config.hidden, kernel_init=init, rngs=rngs)
        self.down = nnx.Linear(config.hidden, dim, kernel_init=out_init, rngs=rngs)

    def project(self, x: jax.Array, positions: jax.Array):
        """Rotated queries and keys, and values, each ``[B, T, heads, head_dim]``."""
        b, t, dim = x.shape
        q, k, v = jnp.split(self.qkv(self.attn_norm(x)), 3, axis=-1)
        q, k, v = (y.reshape(b, t, self.heads, dim // self.heads) for y in (q, k, v))
        return _rotate(q, positions), _rotate(k, positions), v

    def finish(self, x: jax.Array, attended: jax.Array) -> jax.Array:
        """Adds the attention output and the MLP to the residual stream ``x`` ``[B, T, dim]``."""
        x = x + self.out(attended.reshape(x.shape))
        return x + self.down(jax.nn.gelu(self.up(self.mlp_norm(x))))


class Transformer(nnx.Module):
    """Byte-level decoder-only transformer.

    Three entry points share the weights: :meth:`__call__` (teacher forcing, for training),
    :meth:`prefill` (a batch of prompts -> next-token logits and a :class:`Cache`) and
    :meth:`step` (one token per row -> next-token logits and the updated cache), which has the
    ``step_fn`` shape that :func:`jsample.decode` expects once the weights travel in its state.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jsample.model import Config, Transformer
      >>> config = Config(dim=32, heads=2, layers=1, hidden=64, window=16)
      >>> model = Transformer(config, rngs=nnx.Rngs(0))
      >>> logits, cache = model.prefill(jnp.array([[72, 105, 0], [79, 107, 33]]), jnp.array([2, 3]))
      >>> logits.shape, cache.length.tolist()
      ((2, 256), [2, 3])
      >>> logits, cache = model.step(cache, jnp.array([33, 10]))
      >>> cache.length.tolist()
      [3, 4]
    """

    def __init__(self, config: Config, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Embed(config.vocab, config.dim,
                               embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.layers)])
        self.norm = nnx.RMSNorm(config.dim, rngs=rngs)

    def _logits(self, x: jax.Array) -> jax.Array:
        return self.embed.attend(self.norm(x))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Causal logits float32 ``[B, T, vocab]`` for int ``[B, T]`` tokens, ``T <= window``."""
        _, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t), tokens.shape)
        causal = jnp.tril(jnp.ones((t, t), bool))[None]
        x = self.embed(tokens)
        for block in self.blocks:
            q, k, v = block.project(x, positions)
            x = block.finish(x, _attend(q, k, v, causal))
        return self._logits(x)

    def init_cache(self, batch: int) -> Cache:
        """An empty cache for ``batch`` rows."""
        c = self.config
        shape = (c.layers, batch, c.window, c.heads, c.head_dim)
        return Cache(jnp.zeros(shape), jnp.zeros(shape), jnp.zeros((batch,), jnp.int32))

    def prefill(self, tokens: jax.Array, lengths: jax.Array) -> tuple[jax.Array, Cache]:
        """Reads right-padded prompts; returns the logits of each row's next token and the cache.

        Args:
          tokens: int ``[B, T]`` prompts, row ``b`` in ``tokens[b, :lengths[b]]``; ``T <= window``.
          lengths: int ``[B]`` prompt lengths, each in ``[1, T]``.

        Returns:
          ``(logits float32 [B, vocab], cache)``: the logits after ``tokens[b, lengths[b] - 1]``.
        """
        b, t = tokens.shape
        if t > self.config.window:
            raise ValueError(f"prefill: prompts are {t} tokens long; this model reads at most "
                             f"{self.config.window} (its window).")
        lengths = jnp.asarray(lengths, jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(t), tokens.shape)
        causal = jnp.tril(jnp.ones((t, t), bool))[None]
        cache = self.init_cache(b)
        keys, values = [], []
        x = self.embed(tokens)
        for block in self.blocks:
            q, k, v = block.project(x, positions)
            x = block.finish(x, _attend(q, k, v, causal))
            keys.append(k)
            values.append(v)
        # Padding positions are written too; a row never attends past its own length, and each
        # such slot is overwritten by a real token before it becomes visible.
        fill = lambda buf, new: buf.at[:, :, :t].set(jnp.stack(new))
        last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]
        cache = Cache(fill(cache.keys, keys), fill(cache.values, values), lengths)
        return self._logits(last), cache

    def step(self, cache: Cache, tokens: jax.Array) -> tuple[jax.Array, Cache]:
        """Feeds one token per row; returns the logits float32 ``[B, vocab]`` for the next one."""
        window = self.config.window
        rows = jnp.arange(tokens.shape[0])
        position = cache.length  # [B]
        slot = position % window
        # A slot is visible once written; after the first wrap every slot holds one of the last
        # ``window`` positions, the current one included.
        visible = (jnp.arange(window)[None] <= position[:, None])[:, None]  # [B, 1, window]
        x = self.embed(tokens[:, None])
        keys, values = cache.keys, cache.values
        for i, block in enumerate(self.blocks):
            q, k, v = block.project(x, position[:, None])
            keys = keys.at[i, rows, slot].set(k[:, 0])
            values = values.at[i, rows, slot].set(v[:, 0])
            x = block.finish(x, _attend(q, keys[i], values[i], visible))
        return self._logits(x[:, 0]), Cache(keys, values, position + 1)
