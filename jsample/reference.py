"""PyTorch reference samplers: the distributions jsample is tested and benchmarked against.

Two conventions, both batched over rows of ``[B, V]`` logits and computed in float32:

* :func:`seed_probs` / :func:`seed_sample` follow, step for step, the PyTorch ``do_sampling``
  of the seed article (from Freeze-Omni): temperature, softmax, ``torch.topk`` on the
  probabilities with renormalisation, then top-p by sort and cumulative sum, removing every
  sorted position whose cumulative mass is ``> top_p`` except the first (the token that crosses
  ``top_p`` is dropped: jsample's ``top_p_rule="exclusive"``), and ``torch.multinomial``.
* :func:`inclusive_probs` is the nucleus rule of Holtzman et al. (2019) as HF transformers,
  vLLM and labml apply it: temperature, top-k on logits, top-p keeping the token that crosses
  ``top_p``, then min-p on probabilities (jsample's ``top_p_rule="inclusive"``).

:func:`inverse_cdf` is the torch side of :func:`jsample.sample_from_uniform`: given the same
uniforms and the same distribution, both pick the same tokens up to float rounding at a boundary.

These are plain eager PyTorch, written to be read next to the seed, not to be fast. Importing
this module imports torch; ``import jsample`` does not.
"""

from __future__ import annotations

from typing import Union

import torch

Param = Union[float, int, torch.Tensor]


def _as_rows(logits: torch.Tensor, fn: str) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{fn}: logits must be a torch.Tensor, got {type(logits).__name__}.")
    if not logits.is_floating_point():
        raise TypeError(f"{fn}: logits must be floating point, got {logits.dtype}.")
    if logits.dim() not in (1, 2) or logits.shape[-1] == 0:
        raise ValueError(f"{fn}: logits must have shape [V] or [B, V], got {tuple(logits.shape)}.")
    return logits.detach().float().reshape(-1, logits.shape[-1])


def _per_row(name: str, value: Param, rows: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A scalar or a 1-D tensor of one value per row, as a ``[rows]`` tensor."""
    value = torch.as_tensor(value, device=device)
    if value.dim() > 1 or (value.dim() == 1 and value.shape[0] not in (1, rows)):
        raise ValueError(f"{name} must be a scalar or have shape [{rows}], got {tuple(value.shape)}.")
    return value.to(dtype).reshape(-1).expand(rows)


def seed_probs(logits: torch.Tensor, temperature: Param = 1.0, top_k: Param = 20,
               top_p: Param = 0.8) -> torch.Tensor:
    """The distribution the seed article's ``do_sampling`` draws from, one row at a time.

    Each row goes through the seed's steps in its order:

    1. ``logits / temperature`` when ``temperature != 1``;
    2. ``softmax``;
    3. when ``top_k != 0``: ``torch.topk(probs, top_k)``, scatter the ``k`` values into zeros and
       renormalise;
    4. when ``top_p > 0``: sort descending, ``cumsum``, remove every sorted position whose
       cumulative sum is ``> top_p`` except position 0, renormalise.

    Quirks kept on purpose, because they are what the seed does:

    * ``top_p = 0`` (or below) means *off*; in jsample (and HF, vLLM) the off value is 1.0 and
      ``top_p = 0`` keeps only the top token. Map the seed's 0 to jsample's 1.0 when comparing.
    * ``top_p = 1.0`` is not quite off: the float32 cumulative sum of the renormalised
      probabilities can round above 1 before the last positive entry and remove the tail
      tokens.
    * Both filters are positional: tokens tied at the cut-off are split by ``torch.topk`` /
      ``torch.sort`` order, whereas jsample keeps or drops ties together.
    * ``top_k`` is applied to probabilities, so it is clamped to the vocabulary size here (the
      seed's ``torch.topk`` would raise for ``top_k > V``).
    * ``temperature = 0`` divides by zero, as in the seed; it is not greedy.

    Args:
      logits: float ``[B, V]`` (or ``[V]``), any float dtype; upcast to float32 first.
      temperature: scalar or float ``[B]`` tensor, one per row.
      top_k: scalar or integer ``[B]`` tensor; 0 is off.
      top_p: scalar or float ``[B]`` tensor; ``<= 0`` is off.

    Returns:
      float32 ``[B, V]`` probabilities (a 1-D input gives ``[1, V]``).

    Example:
      >>> import torch
      >>> from jsample.reference import seed_probs
      >>> logits = torch.tensor([0.5, 0.25, 0.125, 0.125]).log()
      >>> seed_probs(logits, top_k=0, top_p=0.6).tolist()
      [[1.0, 0.0, 0.0, 0.0]]
    """
    x = _as_rows(logits, "seed_probs")
    rows, vocab = x.shape
    temperature = _per_row("temperature", temperature, rows, torch.float32, x.device)
    top_k = _per_row("top_k", top_k, rows, torch.int64, x.device).clamp(max=vocab)
    top_p = _per_row("top_p", top_p, rows, torch.float32, x.device)

    tempered = temperature != 1.0
    x = torch.where(tempered[:, None], x / temperature[:, None], x)
    probs = torch.softmax(x, dim=-1)

    # torch.topk takes one k, so rows are grouped by their k; each group is exactly the seed's
    # topk -> scatter -> renormalise.
    for k in torch.unique(top_k[top_k != 0]).tolist():
        group = top_k == k
        values, indices = torch.topk(probs[group], k, dim=-1)
        kept = torch.zeros_like(probs[group]).scatter_(-1, indices, values)
        probs[group] = kept / kept.sum(dim=-1, keepdim=True)

    p_on = top_p > 0
    sorted_probs, sorted_indices = torch.sort(probs, dim=-1, descending=True)
    remove_sorted = torch.cumsum(sorted_probs, dim=-1) > top_p[:, None]
    remove_sorted[:, 0] = False
    remove_sorted &= p_on[:, None]
    remove = torch.zeros_like(remove_sorted).scatter_(-1, sorted_indices, remove_sorted)
    nucleus = probs.masked_fill(remove, 0.0)
    # Only rows with top-p on are renormalised: a second division would move other rows by an ulp.
    nucleus = nucleus / nucleus.sum(dim=-1, keepdim=True)
    return torch.where(p_on[:, None], nucleus, probs)


def seed_sample(logits: torch.Tensor, temperature: Param = 1.0, top_k: Param = 20,
                top_p: Param = 0.8, generator: torch.Generator | None = None) -> torch.Tensor:
    """Samples one token per row as the seed does: ``torch.multinomial(probs, 1)`` on each row.

    The seed works on a 1-D row, so each row gets its own ``torch.multinomial`` call, in row
    order, on :func:`seed_probs`; with a fixed ``torch.manual_seed`` (or ``generator``) the
    tokens match a loop over the seed's ``do_sampling``.

    Args:
      logits: float ``[B, V]`` (or ``[V]``).
      temperature, top_k, top_p: as in :func:`seed_probs` (scalars or ``[B]`` tensors).
      generator: a ``torch.Generator``; ``None`` uses torch's default generator.

    Returns:
      int64 ``[B]`` token indices.

    Example:
      >>> import torch
      >>> from jsample.reference import seed_sample
      >>> _ = torch.manual_seed(0)
      >>> seed_sample(torch.tensor([[0.0, 9.0, 0.0]]), top_k=1).tolist()
      [1]
    """
    probs = seed_probs(logits, temperature, top_k, top_p)
    return torch.cat([torch.multinomial(row, 1, generator=generator) for row in probs])


def inclusive_probs(logits: torch.Tensor, temperature: Param = 1.0, top_k: Param = 0,
                    top_p: Param = 1.0, min_p: Param = 0.0) -> torch.Tensor:
    """The nucleus distribution with the inclusive top-p rule (HF transformers, vLLM, labml).

    In order, per row: ``logits / temperature``; top-k on logits (every token whose logit is at
    least the k-th largest, so ties with it are kept, as in HF's ``TopKLogitsWarper``); top-p on
    the softmax of what is left, keeping each sorted token whose mass of strictly higher-ranked
    tokens is ``< top_p`` (so the token that crosses ``top_p`` is kept, and the top token always);
    min-p, keeping tokens with ``prob >= min_p * max_prob``; a final softmax.

    Off values: ``top_k = 0`` (or ``>= V``), ``top_p >= 1``, ``min_p = 0``; ``top_p = 0`` keeps
    only the top token. ``temperature`` must be ``> 0`` (greedy is not modelled here). The top-p
    step is positional: with random float logits there are no ties at the cut-off.

    Args:
      logits: float ``[B, V]`` (or ``[V]``), any float dtype; upcast to float32 first.
      temperature: scalar or float ``[B]`` tensor, ``> 0``.
      top_k: scalar or integer ``[B]`` tensor.
      top_p: scalar or float ``[B]`` tensor in ``[0, 1]``.
      min_p: scalar or float ``[B]`` tensor in ``[0, 1]``.

    Returns:
      float32 ``[B, V]`` probabilities (a 1-D input gives ``[1, V]``).

    Example:
      >>> import torch
      >>> from jsample.reference import inclusive_probs
      >>> logits = torch.tensor([0.5, 0.25, 0.125, 0.125]).log()
      >>> [round(v, 3) for v in inclusive_probs(logits, top_p=0.6)[0].tolist()]
      [0.667, 0.333, 0.0, 0.0]
    """
    x = _as_rows(logits, "inclusive_probs")
    rows, vocab = x.shape
    temperature = _per_row("temperature", temperature, rows, torch.float32, x.device)
    top_k = _per_row("top_k", top_k, rows, torch.int64, x.device)
    top_p = _per_row("top_p", top_p, rows, torch.float32, x.device)
    min_p = _per_row("min_p", min_p, rows, torch.float32, x.device)
    if bool((temperature <= 0).any()):
        raise ValueError("inclusive_probs: temperature must be > 0.")

    x = x / temperature[:, None]
    k_on = (top_k > 0) & (top_k < vocab)
    if bool(k_on.any()):
        descending = torch.sort(x, dim=-1, descending=True).values
        kth = descending.gather(-1, (top_k.clamp(1, vocab) - 1)[:, None])
        x = x.masked_fill(k_on[:, None] & (x < kth), float("-inf"))

    sorted_probs, sorted_indices = torch.sort(torch.softmax(x, dim=-1), dim=-1, descending=True)
    mass_above = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    remove_sorted = (mass_above >= top_p[:, None]) & (top_p[:, None] < 1)
    remove_sorted[:, 0] = False
    remove = torch.zeros_like(remove_sorted).scatter_(-1, sorted_indices, remove_sorted)
    x = x.masked_fill(remove, float("-inf"))

    probs = torch.softmax(x, dim=-1)
    below_min_p = probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    return torch.softmax(x.masked_fill(below_min_p, float("-inf")), dim=-1)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The first index whose cumulative probability exceeds ``u``, per row.

    ``torch.searchsorted(probs.cumsum(-1), u, right=True)``: the torch counterpart of
    :func:`jsample.sample_from_uniform`. When rounding leaves ``u`` at or above a row's total
    the result is clamped to the row's last index with positive probability, so a removed
    token is never returned.

    Args:
      probs: float ``[B, V]`` rows of probabilities (each summing to about 1).
      u: float ``[B]`` uniforms in ``[0, 1)``.

    Returns:
      int64 ``[B]`` token indices.

    Example:
      >>> import torch
      >>> from jsample.reference import inverse_cdf
      >>> probs = torch.tensor([[0.5, 0.25, 0.25]]).expand(3, 3)
      >>> inverse_cdf(probs, torch.tensor([0.1, 0.6, 0.9])).tolist()
      [0, 1, 2]
    """
    if probs.dim() != 2 or u.shape != probs.shape[:1]:
        raise ValueError(
            f"inverse_cdf: probs must be [B, V] and u [B], got {tuple(probs.shape)} and "
            f"{tuple(u.shape)}."
        )
    cumulative = torch.cumsum(probs.float(), dim=-1)
    index = torch.searchsorted(cumulative, u.float()[:, None].contiguous(), right=True)[:, 0]
    positions = torch.arange(probs.shape[-1], device=probs.device)
    last_positive = torch.where(probs > 0, positions, 0).max(dim=-1).values
    return torch.minimum(index, last_positive)
