"""Settings resolution: CLI flag > POOLFLEET_* environment > TOML file > defaults.

Entry points call :func:`resolve` once and pass the frozen dataclass down; the
library never reads the environment itself.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from poolfleet.common.errors import ConfigError

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _convert(name: str, raw: Any, hint: Any) -> Any:
    """Coerce a value from the environment (str) or TOML to the field's type."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if raw is None or raw == "":
            return None
        return _convert(name, raw, inner[0])
    if origin in (tuple, list):
        if isinstance(raw, str):
            items: list[Any] = [p.strip() for p in raw.split(",") if p.strip()]
        elif isinstance(raw, list | tuple):
            items = list(raw)
        else:
            raise ConfigError(f"setting {name!r}: expected a list, got {raw!r}")
        (item_hint, *_) = typing.get_args(hint) or (str,)
        return tuple(_convert(name, i, item_hint) for i in items)
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigError(f"setting {name!r}: expected true or false, got {raw!r}")
    if hint in (int, float):
        return _number(name, raw, hint)
    if hint is Path:
        return Path(str(raw))
    if hint is str:
        return str(raw)
    return raw


def _number(name: str, raw: Any, hint: type[int] | type[float]) -> int | float:
    if isinstance(raw, bool):
        raise ConfigError(f"setting {name!r}: expected a number, got {raw!r}")
    if hint is int and isinstance(raw, float) and not raw.is_integer():
        raise ConfigError(f"setting {name!r}: expected a whole number, got {raw!r}")
    try:
        return hint(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name!r}: expected a number, got {raw!r}") from exc


def load_toml(path: Path, section: str) -> dict[str, Any]:
    """Read ``[section]`` of a TOML file (top-level keys count too)."""
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    values = {k: v for k, v in doc.items() if not isinstance(v, dict)}
    sect = doc.get(section, {})
    if not isinstance(sect, dict):
        raise ConfigError(f"config file {path}: [{section}] must be a table")
    values.update(sect)
    return values


def resolve(
    cls: type[T],
    cli: Mapping[str, Any],
    env: Mapping[str, str],
    env_prefix: str,
    config_file: Path | None = None,
    section: str = "",
) -> T:
    """Build ``cls`` from the four sources, highest precedence first.

    ``cli`` holds only the flags the user gave (None means not given).
    Environment names are ``env_prefix`` + the field name in upper case.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    file_values = load_toml(config_file, section) if config_file else {}
    unknown = set(file_values) - set(fields)
    if unknown:
        raise ConfigError(f"config file {config_file}: unknown setting(s) {', '.join(sorted(unknown))}")
    kwargs: dict[str, Any] = {}
    for name in fields:
        hint = hints[name]
        env_name = env_prefix + name.upper()
        if cli.get(name) is not None:
            kwargs[name] = _convert(name, cli[name], hint)
        elif env_name in env:
            kwargs[name] = _convert(env_name, env[env_name], hint)
        elif name in file_values:
            kwargs[name] = _convert(name, file_values[name], hint)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc
