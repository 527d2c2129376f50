"""Hugging Face Hub ids as models: ``flowserve serve Qwen/Qwen3-0.6B``.

A Hub id already in the local Hugging Face cache is served from there. One that is not is
downloaded, with huggingface_hub's progress bars, by the first process that resolves it: the
server, in its start-time check (``flowserve_check_deployment``), so every instance process
then finds it in the cache. Only what serving needs is fetched: the config, the safetensors
(and their index), the tokenizer and the generation config.

With ``HF_HUB_OFFLINE`` set, or no route to the Hub, the refusal names the id and the way out:
a local path, or ``hf download`` on a machine that reaches the Hub. The test suite sets
``HF_HUB_OFFLINE``, so no test downloads.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flowserve_core.errors import ConfigError

log = logging.getLogger(__name__)

#: The files of a checkpoint that serving reads (no .bin, .pth, .gguf or ONNX copies).
SERVING_FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def looks_like_hub_id(model: str) -> bool:
    """``owner/name``, and not a path (relative paths start with ``.``)."""
    return model.count("/") == 1 and not model.startswith((".", "/", "~")) and all(model.split("/"))


def hub_snapshot(repo_id: str) -> Path:
    """The local directory of ``repo_id``'s serving files, downloaded first if they are not in
    the local cache and the Hub may be asked. ``ConfigError`` naming the id otherwise."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    way_out = (f"pass a local path instead (a model directory with config.json and *.safetensors, or a "
               f".gguf file), or fetch it where the Hub is reachable: `hf download {repo_id}`")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=SERVING_FILES, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"model {repo_id!r} is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set "
                          f"so it cannot be downloaded: {way_out}") from None
    log.info("downloading %s from the Hugging Face Hub", repo_id, extra={"model": repo_id})
    try:
        return Path(snapshot_download(repo_id, allow_patterns=SERVING_FILES))
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise ConfigError(f"model {repo_id!r}: the Hugging Face Hub has no such repository, or it needs a token "
                          f"(`hf auth login`) ({type(exc).__name__})") from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise ConfigError(f"model {repo_id!r} is not in the local Hugging Face cache and the Hub cannot be "
                          f"reached ({type(exc).__name__}): {way_out}") from None
