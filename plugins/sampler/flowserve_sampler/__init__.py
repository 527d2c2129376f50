"""FlowServe's sampler: logits → tokens, the same for every executor.

Executors compute logits their own way (``spmd`` with torch, ``llamacpp`` with ggml) and hand
them to ``Sampler``, so seeds, penalties, ``min_tokens``, top-k/top-p/min-p and logprobs behave
identically whichever executor runs a deployment; so do structured-output constraints, whose
token masks the sampler applies (``deployment_backend(spec, plugins)`` is what executors pass it).
"""

from flowserve_sampler.constraints import allowed_tokens, deployment_backend, fill_from_ids
from flowserve_sampler.sampler import GREEDY_TEMPERATURE, TOP_P_CANDIDATES, Sampler

__all__ = ["GREEDY_TEMPERATURE", "Sampler", "TOP_P_CANDIDATES", "allowed_tokens", "deployment_backend",
           "fill_from_ids"]
