"""The one checked program that tests/test_validation.py and tests/test_fuzz.py both run.

Defined once so that each test process compiles it once for both modules.
"""

import jax

import jsample as js


@jax.jit
@js.checked
def traced_program(keys, logits, temperature, top_k, top_p, min_p, u):
    """Every sampler on traced values, in checked mode: ``(err, (tokens, logprobs, probs, replay))``."""
    params = js.SamplingParams(temperature, top_k, top_p, min_p)
    tokens, logprobs = js.sample(keys, logits, params, return_logprobs=True)
    return tokens, logprobs, js.probs(logits, params), js.sample_from_uniform(u, logits, params)
