"""A small byte-level Flax NNX transformer shipped with jsample, for demos and tests.

Three blocks of width 128 with a 128-byte attention window (about 0.5M parameters), trained by
``scripts/train_model.py`` on the Python language reference that ships with CPython; the float16
weights (about 1 MB) live in this package, so loading is instant and nothing is downloaded.

Example:
  >>> import jax, jsample as js
  >>> from jsample.model import generate, load
  >>> texts, out = generate(load(), ["A list is "], jax.random.key(7),
  ...                       js.SamplingParams(temperature=0.8, top_p=0.9), max_new_tokens=20)
  >>> len(texts), out.tokens.shape
  (1, (1, 20))
"""

from jsample.model.generate import ModelStep as ModelStep
from jsample.model.generate import encode as encode
from jsample.model.generate import generate as generate
from jsample.model.generate import prefill as prefill
from jsample.model.generate import to_text as to_text
from jsample.model.transformer import Cache as Cache
from jsample.model.transformer import Config as Config
from jsample.model.transformer import Transformer as Transformer
from jsample.model.weights import WEIGHTS as WEIGHTS
from jsample.model.weights import load as load
from jsample.model.weights import metadata as metadata
from jsample.model.weights import save as save

__all__ = [
    "Cache",
    "Config",
    "ModelStep",
    "Transformer",
    "WEIGHTS",
    "encode",
    "generate",
    "load",
    "metadata",
    "prefill",
    "save",
    "to_text",
]
