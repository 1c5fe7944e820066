"""jsample: exact, jit-compiled token sampling for JAX language models.

Temperature, top-k, top-p (nucleus) and min-p filtering and the draw itself, as pure functions
with explicit PRNG keys that run under ``jit``/``vmap``/``scan`` on CPU, GPU and TPU.
"""

from jsample.checked import checked as checked
from jsample.decode import DecodeResult as DecodeResult
from jsample.decode import decode as decode
from jsample.params import SamplingParams as SamplingParams
from jsample.processors import apply_temperature as apply_temperature
from jsample.processors import mask_min_p as mask_min_p
from jsample.processors import mask_top_k as mask_top_k
from jsample.processors import mask_top_p as mask_top_p
from jsample.sampling import log_probs as log_probs
from jsample.sampling import probs as probs
from jsample.sampling import sample as sample
from jsample.sampling import sample_from_uniform as sample_from_uniform
from jsample.sharding import sample_sharded as sample_sharded

__version__ = "0.1.0"

__all__ = [
    "DecodeResult",
    "SamplingParams",
    "apply_temperature",
    "checked",
    "decode",
    "log_probs",
    "mask_min_p",
    "mask_top_k",
    "mask_top_p",
    "probs",
    "sample",
    "sample_from_uniform",
    "sample_sharded",
]
