"""Layering of the config sources (defaults < TOML file < `SWARM_NODE_*` environment < command-line flags),
the flag and environment names of every setting, and the generated reference (docs/configuration.md)."""

from __future__ import annotations

import os
import tomllib
import typing
from typing import Any

from pydantic import ValidationError

from swarm_node.config.base import ConfigError
from swarm_node.config.node import SECTIONS, NodeConfig

ENV_PREFIX = "SWARM_NODE_"
RESERVED_ENV = {"SWARM_NODE_CONFIG", "SWARM_NODE_CACHE"}  # not settings: the config file and the model cache


def leaf_fields() -> dict[str, tuple[str | None, Any]]:
    """Map every leaf field name to (section or None, pydantic FieldInfo). Names are unique by construction."""
    out: dict[str, tuple[str | None, Any]] = {}
    for name, info in NodeConfig.model_fields.items():
        if name not in SECTIONS:
            out[name] = (None, info)
    for section in SECTIONS:
        for name, info in NodeConfig.model_fields[section].annotation.model_fields.items():
            assert name not in out, f"config field name {name!r} is not unique"
            out[name] = (section, info)
    return out


def _nest(flat: dict[str, Any], origin: str) -> dict[str, Any]:
    fields = leaf_fields()
    nested: dict[str, Any] = {}
    for name, value in flat.items():
        if name not in fields:
            raise ConfigError(f"unknown setting {name!r} in {origin}; `swarm-node config-doc` lists the valid ones")
        section, _ = fields[name]
        (nested.setdefault(section, {}) if section else nested)[name] = value
    return nested


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; check the --config path") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"config file {path} is not readable TOML ({e}); fix the file or drop --config") from None
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return _nest(flat, f"config file {path}")


def is_list_setting(annotation: Any) -> bool:
    """Whether a setting holds a list (`list[str]`, also inside Optional): its env var is comma-separated and its
    flag takes several values."""
    if typing.get_origin(annotation) is list:
        return True
    return any(typing.get_origin(arg) is list for arg in typing.get_args(annotation))


def _read_env(environ: dict[str, str]) -> dict[str, Any]:
    fields = leaf_fields()
    flat: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key in RESERVED_ENV:
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name not in fields:
            raise ConfigError(f"unknown environment variable {key}; unset it or see `swarm-node config-doc`")
        if is_list_setting(fields[name][1].annotation):
            flat[name] = raw.split(",") if raw else []
        else:
            flat[name] = raw
    return _nest(flat, "the environment")


def flag_name(name: str) -> str:
    """The command-line flag of setting `name`: `--<name with dashes>` (booleans also get `--no-<name>`)."""
    return "--" + name.replace("_", "-")


def flag_argv(overrides: dict[str, Any]) -> list[str]:
    """Command-line arguments that set `overrides` (setting name -> value) in a child `swarm-node run`; the
    inverse of the flags `swarm-node run` generates from the config tree (swarm_node/cli.py)."""
    argv: list[str] = []
    for name, value in overrides.items():
        flag = flag_name(name)
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def load_config(
    file: str | None = None, overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None
) -> NodeConfig:
    """Build a `NodeConfig` from defaults, a TOML file, `SWARM_NODE_*` env vars and flat overrides (CLI flags).

    Raises:
        ConfigError: an unknown key, an unreadable file or an invalid value, with a one-line fix.
    """
    environ = dict(os.environ if environ is None else environ)
    file = file or environ.get(ENV_PREFIX + "CONFIG")
    data: dict[str, Any] = {}
    if file:
        data = _merge(data, _read_file(file))
    data = _merge(data, _read_env(environ))
    data = _merge(data, _nest({k: v for k, v in (overrides or {}).items() if v is not None}, "the command line"))
    try:
        return NodeConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        raise ConfigError(f"invalid setting {where}: {first['msg']} (got {first.get('input')!r})") from None


def config_reference() -> str:
    """Markdown reference of every setting: flag, env var, default and description."""
    lines = ["| flag | env | default | description |", "|---|---|---|---|"]
    for name, (section, info) in leaf_fields().items():
        default = info.default_factory() if info.default_factory else info.default
        flag = flag_name(name)
        lines.append(f"| `{flag}` | `{ENV_PREFIX}{name.upper()}` | `{default!r}` | {info.description or ''} |")
    return "\n".join(lines)
