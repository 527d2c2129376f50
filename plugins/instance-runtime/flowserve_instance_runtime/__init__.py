"""FlowServe's instance runtime: what scalers build on.

- ``InstanceBase`` (``instance``): the server's handle on an engine instance, per-task event
  streams, state, drain and stop; subclasses say how a task reaches the engine.
- ``TargetScaler`` (``target``): the base of scalers, keeping a deployment's instances at
  their target; subclasses say how an instance is made (``make_instance``).
- ``Autoscaler``, ``ScalingPolicy``, ``TtftWindow`` and ``autoscale`` (``policy``): the
  autoscaling policy every autoscaling scaler shares.
- ``RemoteInstance`` and ``spawn_instance_process`` (``remote``): engine instances in their
  own processes, speaking the socket protocol (``protocol``) with the instance worker
  (``worker``, run as ``python -m flowserve_instance_runtime.worker FD``), whose fast-start
  steps are in ``startup``.
- The scaler ``static`` (``plugin``): instance processes kept at a count.

Importing it imports nothing heavy (no torch): plugin processes load it.
"""

from flowserve_instance_runtime.instance import InstanceBase
from flowserve_instance_runtime.policy import (
    AutoscaledScaler,
    Autoscaler,
    LoadSample,
    ScalingPolicy,
    TtftWindow,
    autoscale,
)
from flowserve_instance_runtime.remote import Launcher, ProcessHandle, RemoteInstance, spawn_instance_process
from flowserve_instance_runtime.startup import attach_weights, preload_model, share_weights, warm_executors
from flowserve_instance_runtime.target import TargetScaler

__all__ = [
    "AutoscaledScaler",
    "Autoscaler",
    "InstanceBase",
    "Launcher",
    "LoadSample",
    "ProcessHandle",
    "RemoteInstance",
    "ScalingPolicy",
    "TargetScaler",
    "TtftWindow",
    "attach_weights",
    "autoscale",
    "preload_model",
    "share_weights",
    "spawn_instance_process",
    "warm_executors",
]
