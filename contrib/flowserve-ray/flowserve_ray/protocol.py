"""What crosses between the server and an engine actor: msgspec messages as msgpack bytes
(Ray carries the bytes; no Python object of ours is pickled)."""

from __future__ import annotations

import msgspec

from flowserve_core.types import DeploymentSpec, InstanceInfo, InstanceStats, KVCacheSpec, TokenEvent


class ActorSetup(msgspec.Struct, kw_only=True):
    """What an engine actor is to become."""

    spec: DeploymentSpec
    info: InstanceInfo
    log_level: str = "warning"


class ActorReady(msgspec.Struct, kw_only=True):
    """The actor's engine is built: how its weights came (``start_path``) and where it runs."""

    kv: KVCacheSpec
    start_path: str
    pid: int
    node_id: str
    note: str = ""


class EventBatch(msgspec.Struct, kw_only=True):
    """Events of one or more engine steps and the instance's stats; empty = a heartbeat."""

    events: list[TokenEvent] = []
    stats: InstanceStats = msgspec.field(default_factory=InstanceStats)


encode = msgspec.msgpack.Encoder().encode
decode_batch = msgspec.msgpack.Decoder(EventBatch).decode
decode_ready = msgspec.msgpack.Decoder(ActorReady).decode
decode_setup = msgspec.msgpack.Decoder(ActorSetup).decode
