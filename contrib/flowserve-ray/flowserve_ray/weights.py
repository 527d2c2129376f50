"""Model weights through Ray's object store: the DRAM pre-loading idea on a cluster.

The scaler writes the model's run-ready weights once as a DRAM image (the ``spmd``
executor's ``preload`` API builds it: fused, in the run dtype) and ``ray.put``s the image
into the object store: one object, owned by the server. An actor ``ray.get``s it: Ray
copies the object to the actor's node once, and every actor on that node maps the same
shared-memory pages read-only (a numpy view, zero copy); the model is built with every
parameter a view into them, and handed to the next ``spmd`` executor built in the process.

Where the executor cannot (another executor, tensor parallelism, a device other than CPU)
the scaler publishes nothing and actors load the weights the ordinary way.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import msgspec

from flowserve_core.interfaces import PluginLookup
from flowserve_core.types import DeploymentSpec

log = logging.getLogger(__name__)


class SharedWeights(msgspec.Struct, kw_only=True):
    """The image of a model in the object store: its ``ObjectRef`` and its tensor index."""

    ref: Any
    index: bytes
    nbytes: int


def why_not_shared(spec: DeploymentSpec) -> str:
    """'' when ``spec``'s weights can go through the object store, else the reason."""
    if spec.executor != "spmd":
        return f"executor {spec.executor!r} has no DRAM image API"
    if spec.tensor_parallel != 1:
        return "tensor-parallel ranks load their own shards"
    if spec.device not in ("cpu", "auto"):
        return f"device {spec.device!r} keeps weights on the device"
    return ""


def publish_weights(spec: DeploymentSpec, plugins: PluginLookup) -> SharedWeights:
    """Build (once) the DRAM image of ``spec``'s weights and put it into the object store.
    Blocks (call it in a thread); raises where the executor cannot pre-load."""
    import numpy as np
    import ray

    from flowserve_spmd_executor.preload import ensure_image, image_paths, model_key

    key = model_key(spec, plugins)
    if key.device_type != "cpu":
        raise RuntimeError(f"weights of device {key.device_type!r} do not go through the object store")
    data = ensure_image(spec, plugins)
    _, index = image_paths(key)
    image = np.memmap(data, dtype=np.uint8, mode="r")
    ref = ray.put(np.asarray(image))  # a plain ndarray travels out of band (a memmap pickles a copy)
    log.info("put the weights of %s (%.1f MiB) into the Ray object store", spec.model, image.nbytes / 2**20,
             extra={"model": spec.model, "nbytes": image.nbytes})
    return SharedWeights(ref=ref, index=index.read_bytes(), nbytes=int(image.nbytes))


def map_shared_weights(spec: DeploymentSpec, ref: Any, index: bytes, plugins: PluginLookup) -> tuple[str, list[int]]:
    """In an actor: build ``spec``'s model over the object-store image and leave it for this
    process's next ``spmd`` executor. ``('', the data address of every weight)`` if done, else
    ``(why not, [])`` (the executor then loads)."""
    try:
        return "", _map(spec, ref, index, plugins)
    except Exception as exc:
        log.warning("could not map the weights from the object store", exc_info=True)
        return f"mapping weights from the object store failed ({type(exc).__name__}: {exc})", []


def _map(spec: DeploymentSpec, ref: Any, raw_index: bytes, plugins: PluginLookup) -> list[int]:
    import ray
    import torch

    from flowserve_spmd_executor import preload

    key = preload.model_key(spec, plugins)
    index = msgspec.json.decode(raw_index, type=preload.ImageIndex)
    image = ray.get(ref)  # read-only numpy view of the node's shared copy
    with warnings.catch_warnings():  # read-only on purpose: the weights are never written
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        storage = torch.from_numpy(image)
    model = preload.model_over_image(key, storage, index, plugins, where="the object-store image")
    model._flowserve_image = image  # keep the mapping alive as long as the model
    preload.hand_over(key, model)
    return [param.data_ptr() for param in model.parameters()]
