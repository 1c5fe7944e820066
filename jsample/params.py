"""Sampling parameters: a pytree whose values are traced, so new values never recompile."""

from __future__ import annotations

import dataclasses
from typing import Literal, Union

import jax
import numpy as np
from flax import struct

ArrayLike = Union[float, int, np.ndarray, jax.Array]
TopPRule = Literal["inclusive", "exclusive"]

TOP_P_RULES = ("inclusive", "exclusive")
DEFAULT_CANDIDATES = 64

# The traced fields and the dtype each is stored in; their range checks live in validation.py.
FIELD_DTYPES = {
    "temperature": np.float32,
    "top_k": np.int32,
    "top_p": np.float32,
    "min_p": np.float32,
}


@struct.dataclass
class SamplingParams:
    """What to sample: temperature, top-k, top-p (nucleus) and min-p, one value or one per row.

    The four numeric fields are pytree leaves: each is a Python scalar or an array whose shape
    broadcasts to the batch shape of the logits (``logits.shape[:-1]``), one value per row. They
    are traced under ``jax.jit``, so changing a value, or giving each row its own value, never
    recompiles. Python scalars are stored as float32 / int32 NumPy scalars, so ``temperature=1``
    and ``temperature=0.7`` share one compiled program.

    Attributes:
      temperature: divides the logits. ``0`` means greedy (argmax, lowest index on ties) for that
        row only. Off value ``1.0``. Must be finite and ``>= 0``.
      top_k: keep the ``k`` highest-probability tokens; ties with the k-th value are kept
        together. Off value ``0`` (or any ``k >= vocab``). Must be ``>= 0``.
      top_p: nucleus sampling (Holtzman et al., 2019, arXiv:1904.09751) on the tempered,
        top-k-renormalised distribution. Off value ``1.0``; ``0`` keeps only the top token.
        Must lie in ``[0, 1]``.
      min_p: keep tokens whose probability is at least ``min_p`` times the top probability
        (Nguyen et al., 2024, arXiv:2407.01082). Off value ``0``. Must lie in ``[0, 1]``.
      top_p_rule: static. ``"inclusive"`` keeps the smallest set whose mass reaches ``top_p``
        (a token is kept when the mass of strictly more probable tokens is ``< top_p``: the
        nucleus paper, HF transformers, vLLM, labml). ``"exclusive"`` keeps tokens whose
        cumulative mass, counting every token at least as probable, is ``<= top_p`` (the
        PyTorch ``do_sampling`` reference: the token that crosses ``top_p`` is dropped).
        Both always keep the most probable token(s).
      candidates: static, a speed knob that never changes results: the slots of the first
        candidate tier (the tokens at or above a per-row threshold). A row whose kept set does
        not fit takes a tier with 4x, then 16x the slots (at most half the vocabulary's chunks
        of 64 tokens, or 256), then an exact full-vocabulary path.
        Make it at least the largest ``top_k`` you use (a static bound on per-row ``k``), and
        raise it when most rows keep more tokens than this.

    Example:
      >>> import jsample as js
      >>> params = js.SamplingParams(temperature=0.7, top_k=50, top_p=0.9)
      >>> params.top_p_rule
      'inclusive'
    """

    temperature: ArrayLike = 1.0
    top_k: ArrayLike = 0
    top_p: ArrayLike = 1.0
    min_p: ArrayLike = 0.0
    top_p_rule: TopPRule = struct.field(pytree_node=False, default="inclusive")
    candidates: int = struct.field(pytree_node=False, default=DEFAULT_CANDIDATES)

    def __post_init__(self):
        # Imported here: validation.py imports this module.
        from jsample import validation

        validation.check_static_settings(self.top_p_rule, self.candidates)
        for field in dataclasses.fields(self):
            if field.name in FIELD_DTYPES:
                value = validation.normalize_param(
                    field.name, getattr(self, field.name), FIELD_DTYPES[field.name]
                )
                object.__setattr__(self, field.name, value)
