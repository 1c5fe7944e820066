"""Control flow that suits the backend: branches and loops on the CPU, straight-line code elsewhere.

Much of the sampler's work is needed by some rows only: the wider candidate tiers, the bisection
over the vocabulary, the chunked draw, the rescan for a tied maximum. On XLA:CPU a ``lax.cond``
or a loop costs next to nothing, so the sampler skips what no row needs, loops until its
bisections converge and walks the logits in cache-sized row blocks (style ``"branches"``).

On a GPU each ``cond`` and each ``while`` iteration is decided on the host: the predicate is
copied back and the host waits for the device before it launches what follows. Measured on an
H100 (B=64, V=128256, top-k 50 + top-p 0.9, style "branches"): 0.2 ms of kernels in a 1.4 ms
call. In style ``"straight"`` the cheap branches run unconditionally and a select picks their
results, searches run a fixed number of steps (in a loop whose trip count XLA knows, so no
predicate goes back to the host), and rows are not blocked. Work that costs many passes or
kernel launches when no row needs it stays behind a runtime branch (``run_if(...,
costly=True)``). The same call then took 0.8 ms (README, "On a GPU").

Both styles compute the same results. The style is chosen when a sampler is traced: from
``jax.default_backend()`` unless :func:`use` sets it, and the jitted samplers take it as a static
argument (:func:`styled_jit`), so a compiled program never changes style. A TPU keeps ``"branches"``: it runs
branches and loops on the device (not measured here).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable, Iterator, TypeVar

import jax
import jax.numpy as jnp
from jax import lax

BRANCHES = "branches"
STRAIGHT = "straight"
STYLES = (BRANCHES, STRAIGHT)

T = TypeVar("T")

_STYLE: contextvars.ContextVar[str | None] = contextvars.ContextVar("jsample_control", default=None)


def style() -> str:
    """The style in force: :func:`use`'s, else ``"straight"`` when JAX's default backend is a
    GPU and ``"branches"`` on any other (a TPU runs its branches and loops on the device)."""
    chosen = _STYLE.get()
    if chosen is not None:
        return chosen
    return STRAIGHT if jax.default_backend() == "gpu" else BRANCHES


@contextlib.contextmanager
def use(chosen: str) -> Iterator[None]:
    """Traces inside the ``with`` block use ``chosen`` (``"branches"`` or ``"straight"``).

    jsample's own compiled programs (:func:`styled_jit`: the samplers, ``decode``,
    ``sample_sharded``, the processors) take the style as a static argument, so a call inside
    the block compiles its own program. A program that your own ``jax.jit`` traced earlier keeps
    the style it was traced with.

    Example:
      >>> from jsample import control
      >>> with control.use("straight"):
      ...     control.style()
      'straight'
    """
    if chosen not in STYLES:
        raise ValueError(f"jsample.control.use: style must be one of {STYLES}, got {chosen!r}.")
    token = _STYLE.set(chosen)
    try:
        yield
    finally:
        _STYLE.reset(token)


def styled_jit(**jit_kwargs: Any) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator: ``jax.jit(fn, **jit_kwargs)`` with the style in force at each call as one
    more static argument, under which ``fn`` is traced. A caller may pass ``style=`` itself.

    Example:
      >>> import jax.numpy as jnp
      >>> from jsample import control
      >>> @control.styled_jit()
      ... def scale(x):  # traced once per style
      ...     return x * (2 if control.straight() else 3)
      >>> with control.use("straight"):
      ...     int(scale(jnp.int32(5)))
      10
      >>> with control.use("branches"):  # the default on a CPU or a TPU
      ...     int(scale(jnp.int32(5)))
      15
    """
    static = (*jit_kwargs.pop("static_argnames", ()), "style")

    def wrap(fn: Callable[..., T]) -> Callable[..., T]:
        def traced(*args, style, **kwargs):
            with use(style):
                return fn(*args, **kwargs)

        compiled = jax.jit(traced, static_argnames=static, **jit_kwargs)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            chosen = kwargs.pop("style", None)
            return compiled(*args, style=style() if chosen is None else chosen, **kwargs)

        return call

    return wrap


def straight() -> bool:
    """Whether the style in force is ``"straight"``."""
    return style() == STRAIGHT


def run_if(any_row: jax.Array, fn: Callable[[], T], fallback: T, *, costly: bool = False) -> T:
    """``fn()`` when ``any_row`` holds, else ``fallback`` (arrays of the same shapes).

    A runtime branch in style ``"branches"``, and for ``costly`` work in either style; in style
    ``"straight"`` otherwise ``fn()`` always runs and a select picks. ``fn`` must then be safe
    to run on rows it was not meant for: finite work, whatever it returns there.
    """
    if straight() and not costly:
        out = fn()
        return jax.tree.map(lambda a, b: jnp.where(any_row, a, b), out, fallback)
    return lax.cond(any_row, lambda _: fn(), lambda _: fallback, None)


def until(unfinished: Callable[[T], jax.Array], step: Callable[[T], T], state: T,
          most: int) -> T:
    """``step`` while ``unfinished(state)``, at most ``most`` times.

    A ``while_loop`` in style ``"branches"``. In style ``"straight"``, exactly ``most`` steps
    in a loop whose trip count is known when compiled, which needs no predicate back on the
    host; ``step`` must then leave a finished state as it is.
    """
    if straight():
        return lax.fori_loop(0, most, lambda _, s: step(s), state)
    return lax.while_loop(unfinished, step, state)
