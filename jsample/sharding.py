"""Sampling from logits sharded across a device mesh, without gathering the vocabulary.

A tensor-parallel LM head leaves its logits split over the vocabulary (and, with data parallelism,
over the batch). :func:`sample_sharded` draws the tokens :func:`jsample.sample` draws from the
unsharded logits, while each device reads only its own ``[rows / batch shards, vocab / vocab
shards]`` block. Every decision is taken on the same values as in the unsharded sampler; what
crosses devices, per row, is:

* the row maximum (``pmax``) and, for greedy rows, the first index holding it (``pmin``);
* each vocabulary shard's ``candidates`` largest logits with their token ids. The global
  ``candidates`` largest are among them, so the candidate tier of :mod:`jsample.cutoff` runs on
  the merged pool and finds the unsharded values, keep flags, threshold and certificate. Top-p
  rows without top-k also need the softmax normaliser (``psum``);
* for rows whose kept set is larger than the candidates: one count or mass per bisection step
  (``psum``), see :func:`jsample.cutoff.full_thresholds`;
* for rows drawn over the whole vocabulary (no filter, or after bisection): one probability mass
  per chunk of the unsharded draw (64 tokens), so that every device runs its prefix sum over the
  same masses and picks the same chunk; the device owning that chunk picks the token in it. A
  block that ends inside a chunk borrows the start of the next block (``ppermute``).

Sums taken in another order (the normaliser, bisection masses) and XLA reductions over a
different number of rows per device can round differently from the unsharded sampler, so a
token could differ where the uniform falls within rounding of a cumulative-probability boundary;
tests/test_sharding.py and README ("Multi-device") give the measured agreement.

The mesh plumbing is JAX's own (``jax.shard_map`` over a :class:`jax.sharding.Mesh`): the same
code runs on one host or many.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jsample import control, cutoff, draw, sampling, validation
from jsample.params import FIELD_DTYPES, SamplingParams
from jsample.selection import (
    Layout,
    chunk_size,
    first_argmax,
    is_clean,
    make_layout,
    sanitize_logits,
    smallest_true,
    top_candidates,
)

AxisName = Union[str, Sequence[str], None]

_FN = "jsample.sample_sharded"


def _check_mesh(mesh: Any, vocab_axis: AxisName, batch_axis: AxisName, shape: tuple[int, ...]):
    """Checks the mesh and axis names against 2-D logits; returns ``(vocab_shards, batch_shards)``."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"{_FN}: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    sizes = dict(mesh.shape)
    for arg, name in (("vocab_axis", vocab_axis), ("batch_axis", batch_axis)):
        if name is not None and not isinstance(name, str) and not (
            isinstance(name, tuple) and name and all(isinstance(n, str) for n in name)
        ):
            raise TypeError(
                f"{_FN}: {arg} must be a mesh axis name, a tuple of names or None, got {name!r}."
            )
        for n in validation.axis_names(name):
            if n not in sizes:
                raise ValueError(
                    f"{_FN}: {arg}={name!r} is not an axis of the mesh (axes: {tuple(sizes)})."
                )
    shared = set(validation.axis_names(vocab_axis)) & set(validation.axis_names(batch_axis))
    if shared:
        raise ValueError(
            f"{_FN}: vocab_axis and batch_axis both use mesh axis {sorted(shared)[0]!r}; "
            "a mesh axis can split the batch or the vocabulary, not both."
        )
    counts = []
    for arg, name, dim, what in (
        ("vocab_axis", vocab_axis, shape[1], "vocabulary"),
        ("batch_axis", batch_axis, shape[0], "batch"),
    ):
        count = 1
        for n in validation.axis_names(name):
            count *= sizes[n]
        if dim % count:
            raise ValueError(
                f"{_FN}: the {what} size {dim} (logits shape {shape}) is not divisible by the "
                f"{count} devices along {arg}={name!r}."
            )
        counts.append(count)
    return tuple(counts)


def sample_sharded(key: jax.Array, logits: jax.Array, params: SamplingParams | None = None, *,
                   mesh: Mesh, vocab_axis: AxisName = "model", batch_axis: AxisName = "data",
                   return_logprobs: bool = False):
    """Samples one token per row of logits sharded over a device mesh, as :func:`jsample.sample`.

    ``logits`` is laid out as ``PartitionSpec(batch_axis, vocab_axis)`` on ``mesh``: rows split
    over ``batch_axis`` (data parallelism), the vocabulary over ``vocab_axis`` (a
    tensor-parallel LM head). Each device works on its own block; the full vocabulary of a row
    never lands on one device (see the module docstring for what is exchanged). The tokens are
    those :func:`jsample.sample` draws from the same logits with the same ``key``: same
    parameters, same rules, same uniforms, same inverse-CDF order. (A sum rounded differently
    could only matter at a cumulative-probability boundary; README, "Multi-device", gives the
    measured agreement.) The call runs inside ``jit``, and in :func:`jsample.decode` given a
    ``mesh``.

    Logits laid out differently are moved to that layout first, which copies them.

    Args:
      key: one PRNG key, or one key per row (shape ``[batch]``), as for :func:`jsample.sample`.
      logits: float ``[batch, vocab]``, ideally already sharded as
        ``NamedSharding(mesh, PartitionSpec(batch_axis, vocab_axis))``.
      params: a :class:`jsample.SamplingParams` (scalars or ``[batch]`` values); ``None`` samples
        from ``softmax(logits)``.
      mesh: the :class:`jax.sharding.Mesh` the logits live on.
      vocab_axis: mesh axis name (or tuple of names) splitting the vocabulary, or ``None``.
      batch_axis: mesh axis name (or tuple of names) splitting the rows, or ``None``.
      return_logprobs: also return each token's log-probability, as :func:`jsample.sample` does.

    Returns:
      int32 ``[batch]`` tokens sharded over ``batch_axis``, or ``(tokens, logprobs)``.

    Raises:
      ValueError: an axis is not in ``mesh``, both arguments name the same axis, a size does not
        divide the logits' shape, or the logits are not 2-D.
      TypeError: ``mesh`` is not a :class:`jax.sharding.Mesh`, an axis argument is not a name, a
        tuple of names or ``None``, or the key, logits or params are of the wrong kind.

    Example:
      >>> import jax, jax.numpy as jnp, jsample as js
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((1, jax.device_count()), ("data", "model"))
      >>> logits = jnp.zeros((2, 1024)).at[:, 700].set(9.0)
      >>> logits = jax.device_put(logits, NamedSharding(mesh, P("data", "model")))
      >>> js.sample_sharded(jax.random.key(0), logits, js.SamplingParams(top_k=1), mesh=mesh).tolist()
      [700, 700]
    """
    params = SamplingParams() if params is None else params
    logits = validation.check_logits(logits, _FN)
    validation.check_params(params)
    if logits.ndim != 2:
        raise ValueError(
            f"{_FN}: logits must have shape [batch, vocab], got {tuple(logits.shape)}; "
            "reshape other batch shapes to one batch dimension first."
        )
    batch = tuple(logits.shape[:1])
    vocab_shards, _ = _check_mesh(mesh, vocab_axis, batch_axis, tuple(logits.shape))
    validation.check_key(key, batch, _FN)
    values = [getattr(params, name) for name in FIELD_DTYPES]
    placement = NamedSharding(mesh, P(batch_axis, vocab_axis if vocab_shards > 1 else None))
    # Both are no-ops when the logits already have this placement. Otherwise they move them,
    # which shard_map does not do by itself on mesh axes of type Explicit.
    if not validation.is_traced(logits):
        logits = jax.device_put(logits, placement)
    elif AxisType.Explicit in mesh.axis_types:
        logits = jax.sharding.reshard(logits, placement)
    token, logprob = _sample_sharded(
        key, logits, *values, mesh=mesh, vocab_axis=vocab_axis if vocab_shards > 1 else None,
        batch_axis=batch_axis, rule=params.top_p_rule, count=params.candidates,
    )
    return (token, logprob) if return_logprobs else token


@control.styled_jit(static_argnames=("mesh", "vocab_axis", "batch_axis", "rule", "count"))
def _sample_sharded(key, logits, temperature, top_k, top_p, min_p, *, mesh, vocab_axis,
                    batch_axis, rule, count):
    batch, vocab = logits.shape
    params = [
        validation.broadcast_param(name, value, (batch,), dtype)
        for (name, dtype), value in zip(FIELD_DTYPES.items(), (temperature, top_k, top_p, min_p))
    ]
    if vocab_axis is None:
        # Every device holds whole rows: the single-device sampler runs on each batch shard.
        shard_body = functools.partial(sampling._sample_rows, rule=rule, count=count)
    else:
        shards = math.prod(mesh.shape[name] for name in validation.axis_names(vocab_axis))
        shard_body = functools.partial(
            _sample_shard, vocab=vocab, plan=_chunk_plan(vocab, shards), vocab_axis=vocab_axis,
            rule=rule, count=count,
        )

    def body(key, logits, *params):
        # The key and the [batch] parameters come replicated: every device derives all the
        # uniforms exactly as jsample.sample does (one per row of the flattened batch, or one
        # per row key), then keeps its own rows. That is a few bytes per row, and no host has
        # to build a sharded array of them.
        rows = logits.shape[0]
        first = lax.axis_index(batch_axis) * rows if batch_axis is not None else 0
        mine = lambda a: lax.dynamic_slice_in_dim(a, first, rows)
        u = sampling._uniforms(_FN, key, (batch,))
        return shard_body(mine(u), logits, *map(mine, params))

    rows_spec = P(batch_axis)
    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(), P(batch_axis, vocab_axis)) + (P(),) * 4,
        out_specs=(rows_spec, rows_spec),
        # The core's runtime branches return constants for skipped work, which the replication
        # checker types as invariant against the computed (varying) branch. Every output is
        # invariant along vocab_axis by construction (reduced with pmax/pmin/psum or computed
        # from gathered values); the tests compare it with the unsharded sampler.
        check_vma=False,
    )(key, logits, *params)


def _local_layout(logits: jax.Array) -> Layout:
    """This device's block as a float32 layout, sanitised when some row holds NaN or +inf.

    Sanitising leaves clean values unchanged, so whether a neighbour row (or a neighbour
    device) triggered it never changes a row's result.
    """
    layout = make_layout(logits.astype(jnp.float32))

    def sanitized():
        clean = make_layout(sanitize_logits(layout.x))
        return clean.x, clean.chunk_max

    # Only the arrays go through the branch: the layout's sizes must stay Python ints.
    x, chunk_max = lax.cond(
        is_clean(layout), lambda: (layout.x, layout.chunk_max), sanitized
    )
    return layout._replace(x=x, chunk_max=chunk_max)


def _sample_shard(u, logits, temperature, top_k, top_p, min_p, *, vocab, plan, vocab_axis, rule,
                  count):
    """The per-device body: ``[n]`` uniforms and parameters, ``[n, vocab / shards]`` logits."""
    params = validation.sanitize_params(temperature, top_k, top_p, min_p)
    layout = _local_layout(logits)
    start = lax.axis_index(vocab_axis) * layout.vocab
    # Each exchange runs under a named scope, which labels its collectives in profiles and in
    # the compiled HLO (benchmarks/sharding.py reads them to count bytes per parameter mix).
    with jax.named_scope("row_max"):
        row_max = lax.pmax(layout.chunk_max.max(axis=-1), vocab_axis)
    # prepare_rows reads the row statistics from chunk_max and vocab: hand it the global ones,
    # then keep the local block for the passes over logits.
    rows = cutoff.prepare_rows(
        layout._replace(vocab=vocab, chunk_max=row_max[:, None]), *params
    )._replace(layout=layout)
    # Checked mode (jsample.checked) finds NaN and +inf in this block, but whether a row has a
    # finite logit is a global fact: one extra column, finite exactly for such rows, says it.
    validation.report_logits(
        jnp.concatenate([logits, jnp.where(rows.valid, 0.0, -jnp.inf)[:, None]], axis=1)
    )

    n = u.shape[0]
    zeros = (jnp.zeros((n,), jnp.int32), jnp.zeros((n,), jnp.float32))
    plain = rows.greedy | ~rows.valid

    def sampled():
        cands, use_candidates, threshold = _resolve(rows, rule, count, start, vocab, vocab_axis)
        from_candidates = control.run_if(
            jnp.any(use_candidates), lambda: draw.draw_candidates(rows, cands, u), zeros
        )
        with jax.named_scope("chunked_draw"):
            from_chunks = control.run_if(
                jnp.any(~use_candidates & ~plain),
                lambda: _draw_chunked(rows, threshold, u, plan, vocab_axis),
                zeros,
            )
        return tuple(jnp.where(use_candidates, a, b) for a, b in zip(from_candidates, from_chunks))

    # Every value a branch condition reads is the same on all devices of a vocabulary group
    # (parameters, uniforms and reduced statistics), so the group takes the same branch and
    # meets at the same collectives.
    token, logprob = control.run_if(jnp.any(~plain), sampled, zeros, costly=True)
    with jax.named_scope("first_argmax"):
        greedy = _first_argmax(
            layout, jnp.where(rows.valid, rows.row_max, -jnp.inf), start, vocab, vocab_axis
        )
    token = jnp.where(plain, greedy, token)
    logprob = jnp.where(rows.greedy, 0.0, logprob)
    logprob = jnp.where(rows.valid, logprob, -jnp.inf)
    return token, logprob


def _first_argmax(layout: Layout, row_max, start, vocab: int, vocab_axis) -> jax.Array:
    """The lowest global index holding the row maximum: the local first hit, then ``pmin``."""
    local = first_argmax(layout, row_max)
    holds = layout.chunk_max.max(axis=-1) == row_max
    return lax.pmin(jnp.where(holds, start + local, vocab), vocab_axis)


def _resolve(rows: cutoff.Rows, rule: str, count: int, start, vocab: int, vocab_axis):
    """:func:`jsample.cutoff.resolve` across vocabulary shards; same returns.

    The candidate tier runs on the pool of every shard's ``count`` largest logits: the global
    ``count`` largest are among them, so :func:`jsample.cutoff.candidate_cutoff` finds the same
    values, keep flags, threshold and certificate as on the whole row. The returned indices are
    token ids.
    """
    n = rows.row_max.shape[0]
    count = min(count, vocab)
    filtered = rows.filtered

    def tier_one():
        needs_mass = filtered & ~rows.k_on & rows.p_on
        with jax.named_scope("softmax_mass"):
            mass = control.run_if(
                jnp.any(needs_mass),
                lambda: lax.psum(cutoff.full_mass(rows), vocab_axis),
                jnp.ones((n,)),
            )
        with jax.named_scope("candidate_pool"):
            pool_rows, pool_ids = _candidate_pool(rows, count, start, vocab, vocab_axis)
        cands = cutoff.candidate_cutoff(pool_rows, count, rule, mass)
        return cands._replace(indices=jnp.take_along_axis(pool_ids, cands.indices, axis=1))

    empty = cutoff.Candidates(
        values=jnp.full((n, count), -jnp.inf),
        indices=jnp.zeros((n, count), jnp.int32),
        keep=jnp.zeros((n, count), bool),
        threshold=jnp.full((n,), cutoff.LOWEST),
        certified=jnp.zeros((n,), bool),
    )
    cands = control.run_if(jnp.any(filtered), tier_one, empty)
    use_candidates = filtered & cands.certified
    needs_full = filtered & ~cands.certified
    with jax.named_scope("bisection"):
        full = control.run_if(
            jnp.any(needs_full),
            lambda: _full_thresholds(rows, rule, needs_full, vocab_axis),
            jnp.full((n,), cutoff.LOWEST),
            costly=True,
        )
    threshold = jnp.where(
        use_candidates, cands.threshold, jnp.where(needs_full, full, cutoff.LOWEST)
    )
    return cands, use_candidates, threshold


def _candidate_pool(rows: cutoff.Rows, count: int, start, vocab: int, vocab_axis):
    """Rows over the merged pool of every shard's ``count`` largest logits, and the pool's ids.

    The pool layout reports the global ``vocab``, so the candidate tier's certificate (which
    trusts a pool as large as the vocabulary) holds for the whole row, not the pool.
    """
    layout = rows.layout
    values, ids = top_candidates(layout, min(count, layout.vocab))
    values = lax.all_gather(values, vocab_axis, axis=1, tiled=True)  # [n, shards * count]
    ids = lax.all_gather(ids + start, vocab_axis, axis=1, tiled=True)
    pool = Layout(
        x=values,
        vocab=vocab,
        chunk=values.shape[1],
        chunks=1,
        chunk_max=values.max(axis=1, keepdims=True),
    )
    return rows._replace(layout=pool), ids


def _full_thresholds(rows: cutoff.Rows, rule: str, active, vocab_axis) -> jax.Array:
    """:func:`jsample.cutoff.full_thresholds` with every count and mass summed over the shards.

    Counts are exact integers; masses are float sums whose order differs from the unsharded
    one, which can only matter when a cumulative mass equals ``top_p`` times the total to the
    last bit.
    """
    x = rows.layout.x
    total = lambda a: lax.psum(jnp.sum(a, axis=1), vocab_axis)
    need_k = active & rows.k_on
    k_threshold = smallest_true(
        lambda v: total(x > v[:, None]) < rows.top_k, rows.row_max, need_k
    )
    weight = jnp.where(x >= k_threshold[:, None], jnp.exp(rows.scaled(x)), 0.0)
    budget = rows.top_p * total(weight)
    if rule == "inclusive":
        predicate = lambda v: total(jnp.where(x > v[:, None], weight, 0.0)) < budget
    else:
        predicate = lambda v: total(jnp.where(x >= v[:, None], weight, 0.0)) <= budget
    p_threshold = smallest_true(predicate, rows.row_max, active & rows.p_on)
    return jnp.maximum(k_threshold, p_threshold)


class _ChunkPlan(NamedTuple):
    """Static plan: the unsharded draw's chunks, each owned by the shard holding its first token.

    A chunk that runs past the end of its owner's block is completed with the first ``halo``
    tokens of the next shard, so every chunk mass is summed by one device over the same values
    as in the unsharded draw.
    """

    chunk: int  # tokens per chunk
    width: int  # tokens per shard
    slots: int  # chunk slots per shard: the most chunks a shard owns
    halo: int  # tokens each shard borrows from the next one (0 when the blocks align)
    first: tuple[int, ...]  # [shards] first chunk each shard owns
    owned: tuple[int, ...]  # [shards] how many chunks each shard owns
    offsets: tuple[int, ...]  # [shards] where the first owned chunk starts in the shard's block

    @property
    def aligned(self) -> bool:
        """Every block is exactly its own chunks: no borrowing, no shifting, no padding."""
        return self.halo == 0 and self.slots * self.chunk == self.width and not any(self.offsets)


def _chunk_plan(vocab: int, shards: int) -> _ChunkPlan:
    width = vocab // shards
    chunk = chunk_size(vocab)
    if chunk > width:
        # A chunk would span several shards (a vocabulary under 64 tokens per shard): use
        # shard-sized chunks. The draw stays exact in distribution, but its sums are grouped
        # differently from the unsharded ones, so a token can differ at a rounding boundary.
        chunk = width
    first = [-(-s * width // chunk) for s in range(shards)]
    owned = [end - start for start, end in zip(first, first[1:] + [-(-vocab // chunk)])]
    # How far each shard's last chunk reaches into the next block (the last shard's reaches
    # past the vocabulary, into padding).
    reach = [(f + o) * chunk - (s + 1) * width for s, (f, o) in enumerate(zip(first, owned))]
    return _ChunkPlan(
        chunk=chunk,
        width=width,
        slots=max(owned),
        halo=max(reach[:-1] + [0]),
        first=tuple(first),
        owned=tuple(owned),
        offsets=tuple(f * chunk - s * width for s, f in enumerate(first)),
    )


def _draw_chunked(rows: cutoff.Rows, threshold, u, plan: _ChunkPlan,
                  vocab_axis) -> tuple[jax.Array, jax.Array]:
    """:func:`jsample.draw.draw_chunked` across shards; returns ``(token [n], logprob [n])``.

    Each shard sums the chunks it owns (see :class:`_ChunkPlan`); the ``[n, chunks]`` chunk
    masses (one float per chunk of 64 tokens) are gathered so that every device runs the
    unsharded draw's prefix sum over chunks on the same values, in the same order, and picks the
    same chunk. The shard owning it picks the token inside it; a ``psum`` of one value and
    zeros shares the result.
    """
    shard = lax.axis_index(vocab_axis)
    n = u.shape[0]
    x = rows.layout.x[:, : plan.width]
    span = plan.slots * plan.chunk
    if not plan.aligned:
        if plan.halo:
            shards = len(plan.first)
            borrowed = lax.ppermute(
                x[:, : plan.halo], vocab_axis, perm=[(s + 1, s) for s in range(shards - 1)]
            )
            # The last shard receives zeros; its last chunk ends at the vocabulary's end.
            x = jnp.concatenate([x, jnp.where(shard == shards - 1, -jnp.inf, borrowed)], axis=1)
        room = max(plan.offsets) + span - x.shape[1]
        if room > 0:
            x = jnp.pad(x, ((0, 0), (0, room)), constant_values=-jnp.inf)
        x = lax.dynamic_slice_in_dim(x, jnp.asarray(plan.offsets)[shard], span, axis=1)
    blocks = x.reshape(n, plan.slots, plan.chunk)
    local_mass = jnp.sum(rows.weights(blocks, threshold), axis=-1)
    local_mass = jnp.where(jnp.arange(plan.slots) < jnp.asarray(plan.owned)[shard], local_mass, 0.0)
    slots = lax.all_gather(local_mass, vocab_axis, axis=1, tiled=True)  # [n, shards * slots]
    order = [s * plan.slots + i for s, o in enumerate(plan.owned) for i in range(o)]
    chunk_mass = slots[:, np.asarray(order)] if len(order) < slots.shape[1] else slots

    cum = jnp.cumsum(chunk_mass, axis=-1)
    total = cum[:, -1]
    target = u * total
    chunk, _ = draw.pick(chunk_mass, target, cum)
    after = jnp.take_along_axis(cum, chunk[:, None], axis=1)[:, 0]
    before = after - jnp.take_along_axis(chunk_mass, chunk[:, None], axis=1)[:, 0]
    owner = jnp.asarray(np.repeat(np.arange(len(plan.owned)), plan.owned))[chunk]
    slot = chunk - jnp.asarray(plan.first)[owner]
    block = jnp.take_along_axis(blocks, slot[:, None, None], axis=1)[:, 0]
    offset, _ = draw.pick(rows.weights(block, threshold), target - before)
    scaled = rows.scaled(jnp.take_along_axis(block, offset[:, None], axis=1))[:, 0]
    mine = owner == shard
    token = lax.psum(jnp.where(mine, chunk * plan.chunk + offset, 0), vocab_axis)
    scaled = lax.psum(jnp.where(mine, scaled, 0.0), vocab_axis)
    return token, scaled - jnp.log(total)
