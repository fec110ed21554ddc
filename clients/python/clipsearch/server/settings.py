"""Layered settings: defaults < YAML file < ``CLIPSEARCH_*`` environment < flags.

A service declares its settings as a dataclass. Every field becomes a YAML key,
an environment variable ``CLIPSEARCH_<FIELD>`` and a flag ``--field-name``.
The YAML file may hold the keys at the top level, in a section named after the
service (``encoder:``, ``index:``, ``gateway:``, each a mapping), or both; the
section wins.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

ENV_PREFIX = "CLIPSEARCH_"
T = TypeVar("T")


class SettingsError(ValueError):
    """A setting has a bad value or an unknown name."""


@dataclasses.dataclass
class ServerSettings:
    """Settings every service has."""

    host: str = dataclasses.field(default="127.0.0.1", metadata={"help": "address to bind"})
    port: int = dataclasses.field(default=0, metadata={"help": "gRPC port (0 picks a free one)"})
    metrics_port: int = dataclasses.field(
        default=-1, metadata={"help": "Prometheus /metrics HTTP port (0 picks a free one, -1 disables)"}
    )
    max_message_mb: int = dataclasses.field(default=64, metadata={"help": "max gRPC message size in MiB"})
    max_concurrent_rpcs: int = dataclasses.field(
        default=256, metadata={"help": "calls in flight beyond this get RESOURCE_EXHAUSTED"}
    )
    max_connection_age_seconds: float = dataclasses.field(
        default=300.0,
        metadata={"help": "close client connections after this long (they reconnect and re-resolve DNS, "
                          "so new replicas get traffic); 0 = never"},
    )
    grace_seconds: float = dataclasses.field(
        default=10.0, metadata={"help": "on SIGTERM, time allowed for in-flight calls to finish"}
    )
    drain_delay_seconds: float = dataclasses.field(
        default=1.0,
        metadata={"help": "on SIGTERM, keep serving this long with health NOT_SERVING so load balancers notice"},
    )
    log_level: str = dataclasses.field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING or ERROR"})
    log_json: bool = dataclasses.field(default=False, metadata={"help": "log one JSON object per line"})
    tls_cert: str = dataclasses.field(default="", metadata={"help": "PEM certificate for TLS on the gRPC port"})
    tls_key: str = dataclasses.field(default="", metadata={"help": "PEM private key for TLS on the gRPC port"})
    port_file: str = dataclasses.field(
        default="", metadata={"help": "once serving, write {port, metrics_port, pid} as JSON to this file"}
    )
    tls_client_ca: str = dataclasses.field(
        default="", metadata={"help": "PEM CA bundle; when set, clients must present a certificate (mTLS)"}
    )


def _field_type(cls: type, field: dataclasses.Field) -> type:
    hints = typing.get_type_hints(cls)
    return hints[field.name]


def parse_value(kind: type, raw: Any, name: str) -> Any:
    if raw is None:
        return None
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise SettingsError(f"{name}: expected a boolean (true/false), got {raw!r}")
    if kind in (int, float):
        try:
            return kind(raw)
        except (TypeError, ValueError):
            raise SettingsError(f"{name}: expected {kind.__name__}, got {raw!r}") from None
    if typing.get_origin(kind) is list:
        if isinstance(raw, str):
            return [item.strip() for item in raw.split(",") if item.strip()]
        if isinstance(raw, (list, tuple)):
            return [str(item) for item in raw]
        raise SettingsError(f"{name}: expected a list or a comma-separated string, got {raw!r}")
    return str(raw)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_arg_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description + "\n\nEvery flag can also be set in the YAML file (--config) "
        f"or as an environment variable {ENV_PREFIX}<NAME>; flags win over both.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML settings file", default=os.environ.get(ENV_PREFIX + "CONFIG"))
    for field in dataclasses.fields(cls):
        kind = _field_type(cls, field)
        help_text = field.metadata.get("help", "")
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        help_text += f" (default: {default!r}; env {ENV_PREFIX}{field.name.upper()})"
        if kind is bool:
            parser.add_argument(_flag(field.name), dest=field.name, default=None,
                                action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(_flag(field.name), dest=field.name, default=None, help=help_text)
    return parser


def load_settings(
    cls: type[T],
    *,
    section: str,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    prog: str | None = None,
    description: str = "",
) -> T:
    """Settings of dataclass ``cls`` from defaults, YAML, environment and flags."""
    environ = os.environ if environ is None else environ
    parser = build_arg_parser(cls, prog or f"python -m {section}", description)
    args = parser.parse_args(list(argv) if argv is not None else None)
    config_path = args.config
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}

    if config_path:
        path = Path(config_path)
        if not path.is_file():
            raise SettingsError(f"config file {config_path} does not exist")
        document = yaml.safe_load(path.read_text()) or {}
        if not isinstance(document, dict):
            raise SettingsError(f"config file {config_path} must hold a mapping of settings")
        # A top-level mapping named after a service is that service's section; any
        # other top-level key is a setting (the gateway's `encoder: host:port` included).
        sections = {"encoder", "index", "gateway", "cli"}
        layered = {k: v for k, v in document.items() if not (k in sections and isinstance(v, dict))}
        own = document.get(section)
        layered.update(own if isinstance(own, dict) else {})
        unknown = set(layered) - names
        if unknown:
            raise SettingsError(
                f"unknown settings in {config_path}: {sorted(unknown)}; valid names: {sorted(names)}"
            )
        values.update(layered)

    for name in names:
        env_name = ENV_PREFIX + name.upper()
        if env_name in environ:
            values[name] = environ[env_name]

    for name in names:
        flag_value = getattr(args, name)
        if flag_value is not None:
            values[name] = flag_value

    fields = {f.name: f for f in dataclasses.fields(cls)}
    parsed = {name: parse_value(_field_type(cls, fields[name]), raw, name) for name, raw in values.items()}
    return cls(**parsed)
