"""FlowServe's sampler: logits → tokens, the same for every executor.

Executors compute logits their own way (``spmd`` with torch, ``llamacpp`` with ggml) and hand
them to ``Sampler``, so seeds, penalties, ``min_tokens``, top-k/top-p/min-p and logprobs behave
identically whichever executor runs a deployment, and prompts are scored alike
(``prompt_targets``, ``score_tokens``: ``prompt_logprobs``); so do structured-output constraints, whose
token masks the sampler applies (``deployment_backend(spec, plugins)`` is what executors pass it).
Embeddings are finished alike too (``Pooler``: mean over chunks, ``dimensions``, normalization).
"""

from flowserve_sampler.constraints import allowed_tokens, deployment_backend, fill_from_ids
from flowserve_sampler.pooling import Pooler, finish_embedding
from flowserve_sampler.sampler import (
           GREEDY_TEMPERATURE,
           TOP_P_CANDIDATES,
           Sampler,
           prompt_targets,
           score_prompts,
           score_tokens,
)

__all__ = ["GREEDY_TEMPERATURE", "Pooler", "Sampler", "finish_embedding", "TOP_P_CANDIDATES", "allowed_tokens", "deployment_backend",
           "fill_from_ids", "prompt_targets", "score_prompts", "score_tokens"]
