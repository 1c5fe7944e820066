"""Saving and loading :class:`~jsample.model.Transformer` weights as one ``.npz`` file.

The file holds every parameter under its ``/``-joined NNX path, stored as float16 to halve the
package size (they are upcast to float32 on load), plus the :class:`~jsample.model.Config` and
training notes as JSON under ``__meta__``. Loading builds the model abstractly
(``nnx.eval_shape``) and fills it with the stored arrays, so no random initialisation runs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jsample.model.transformer import Config, Transformer

WEIGHTS = Path(__file__).with_name("weights.npz")
"""The weights shipped with jsample (trained by ``scripts/train_model.py``)."""

_META = "__meta__"


def _key(path: tuple) -> str:
    return "/".join(str(part) for part in path)


def save(model: Transformer, path: str | Path, **notes: Any) -> None:
    """Writes ``model``'s parameters (float16) and config, plus JSON-serialisable ``notes``."""
    _, params = nnx.split(model, nnx.Param)
    arrays = {_key(p): np.asarray(v[...], np.float16) for p, v in nnx.to_flat_state(params)}
    meta = {"config": dataclasses.asdict(model.config), **notes}
    with open(path, "wb") as f:
        np.savez(f, **arrays, **{_META: np.array(json.dumps(meta))})


def metadata(path: str | Path = WEIGHTS) -> dict[str, Any]:
    """The config and training notes stored with a weights file."""
    with np.load(path) as data:
        return json.loads(str(data[_META]))


def load(path: str | Path = WEIGHTS) -> Transformer:
    """Builds the :class:`Transformer` stored in ``path`` (default: the shipped weights).

    Example:
      >>> from jsample.model import load
      >>> model = load()
      >>> model.config.vocab
      256
    """
    with np.load(path) as data:
        meta = json.loads(str(data[_META]))
        stored = {name: data[name] for name in data.files if name != _META}
    config = Config(**meta["config"])
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    filled = []
    for p, var in nnx.to_flat_state(params):
        name = _key(p)
        if name not in stored or stored[name].shape != var.shape:
            found = stored[name].shape if name in stored else "nothing"
            raise ValueError(
                f"{path}: parameter {name} should have shape {var.shape}, found {found}."
            )
        filled.append((p, var.replace(jnp.asarray(stored.pop(name), jnp.float32))))
    if stored:
        raise ValueError(f"{path}: unexpected parameters {sorted(stored)}.")
    return nnx.merge(graphdef, nnx.from_flat_state(filled), rest)
