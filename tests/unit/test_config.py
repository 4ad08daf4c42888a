"""Settings resolution: CLI > environment > TOML > defaults, conversions and clear errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from poolfleet.common.config import load_toml, resolve
from poolfleet.common.errors import ConfigError
from poolfleet.master.settings import WORKER_RECONNECT_MAX_S, MasterSettings

PREFIX = "PF_T_"


@dataclass(frozen=True)
class Sample:
    name: str = "default-name"
    count: int = 1
    ratio: float = 0.5
    flag: bool = False
    items: tuple[str, ...] = ("a",)
    numbers: tuple[int, ...] = ()
    where: Path = Path("here")
    maybe_text: str | None = "set"
    maybe_path: Path | None = None
    maybe_int: int | None = None

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError("count must not be negative")


def toml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "pf.toml"
    p.write_text(text)
    return p


def test_defaults_when_nothing_is_given() -> None:
    assert resolve(Sample, {}, {}, PREFIX) == Sample()


def test_precedence_cli_over_env_over_toml_over_default(tmp_path: Path) -> None:
    cfg = toml(tmp_path, "[s]\nname = 'from-toml'\ncount = 3\nratio = 0.25\n")
    env = {"PF_T_NAME": "from-env", "PF_T_COUNT": "2"}
    cli = {"name": "from-cli", "count": None, "ratio": None}  # None: flag not given
    s = resolve(Sample, cli, env, PREFIX, cfg, "s")
    assert (s.name, s.count, s.ratio, s.flag) == ("from-cli", 2, 0.25, False)


def test_env_names_use_the_prefix_and_upper_case() -> None:
    s = resolve(Sample, {}, {"PF_T_COUNT": "4", "count": "9", "PF_T_count": "8"}, PREFIX)
    assert s.count == 4


def test_toml_top_level_keys_count_and_the_section_wins(tmp_path: Path) -> None:
    cfg = toml(tmp_path, "name = 'top'\ncount = 5\n[s]\ncount = 6\n[other]\nflag = 'not ours'\n")
    s = resolve(Sample, {}, {}, PREFIX, cfg, "s")
    assert (s.name, s.count, s.flag) == ("top", 6, False)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1", True), ("true", True), ("Yes", True), (" on ", True), ("0", False), ("off", False), ("", False)],
)
def test_bool_from_env(raw: str, expected: bool) -> None:
    assert resolve(Sample, {}, {"PF_T_FLAG": raw}, PREFIX).flag is expected


def test_conversions_from_env() -> None:
    env = {
        "PF_T_COUNT": "12",
        "PF_T_RATIO": "1e-3",
        "PF_T_ITEMS": "x, y,,z ",
        "PF_T_NUMBERS": "1,2",
        "PF_T_WHERE": "/var/lib/pf",
        "PF_T_MAYBE_TEXT": "",
        "PF_T_MAYBE_PATH": "rel/dir",
        "PF_T_MAYBE_INT": "7",
    }
    s = resolve(Sample, {}, env, PREFIX)
    assert s.count == 12 and isinstance(s.count, int)
    assert s.ratio == 0.001
    assert s.items == ("x", "y", "z")
    assert s.numbers == (1, 2)
    assert s.where == Path("/var/lib/pf")
    assert s.maybe_text is None  # empty means unset for optional settings
    assert s.maybe_path == Path("rel/dir")
    assert s.maybe_int == 7


def test_conversions_from_toml_and_cli(tmp_path: Path) -> None:
    cfg = toml(tmp_path, "[s]\nitems = ['p', 'q']\nratio = 2\ncount = 3.0\nflag = true\nmaybe_int = 4\n")
    s = resolve(Sample, {"numbers": [5, "6"]}, {}, PREFIX, cfg, "s")
    assert s.items == ("p", "q")
    assert s.ratio == 2.0 and isinstance(s.ratio, float)
    assert s.count == 3 and isinstance(s.count, int)
    assert s.flag is True
    assert s.maybe_int == 4
    assert s.numbers == (5, 6)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PF_T_COUNT": "many"}, "setting 'PF_T_COUNT': expected a number, got 'many'"),
        ({"PF_T_COUNT": "1.5"}, "PF_T_COUNT"),
        ({"PF_T_RATIO": "fast"}, "setting 'PF_T_RATIO': expected a number"),
        ({"PF_T_FLAG": "maybe"}, "setting 'PF_T_FLAG': expected true or false, got 'maybe'"),
        ({"PF_T_NUMBERS": "1,x"}, "PF_T_NUMBERS"),
        ({"PF_T_MAYBE_INT": "x"}, "PF_T_MAYBE_INT"),
    ],
)
def test_bad_env_values_give_config_errors_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve(Sample, {}, env, PREFIX)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("count = true", "setting 'count': expected a number, got True"),
        ("count = 1.5", "setting 'count': expected a whole number, got 1.5"),
        ("items = 3", "setting 'items': expected a list, got 3"),
        ("flag = 'perhaps'", "setting 'flag'"),
    ],
)
def test_bad_toml_values(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve(Sample, {}, {}, PREFIX, toml(tmp_path, text), "s")
    assert message in str(info.value)


def test_unknown_toml_keys_are_refused_by_name(tmp_path: Path) -> None:
    cfg = toml(tmp_path, "[s]\ncount = 1\ncuont = 2\nzzz = 3\n")
    with pytest.raises(ConfigError) as info:
        resolve(Sample, {}, {}, PREFIX, cfg, "s")
    assert str(info.value) == f"config file {cfg}: unknown setting(s) cuont, zzz"


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_toml(tmp_path / "missing.toml", "s")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_toml(toml(tmp_path, "count = = 1"), "s")
    with pytest.raises(ConfigError, match=r"\[s\] must be a table"):
        load_toml(toml(tmp_path, "s = 1"), "s")


def test_validation_errors_of_the_settings_class_become_config_errors() -> None:
    with pytest.raises(ConfigError, match="count must not be negative"):
        resolve(Sample, {"count": -1}, {}, PREFIX)


def test_resolve_needs_a_dataclass() -> None:
    with pytest.raises(TypeError):
        resolve(dict, {}, {}, PREFIX)


def test_master_settings_from_env_and_their_checks() -> None:
    env = {"POOLFLEET_MASTER_PREFETCH": "0", "POOLFLEET_MASTER_METRICS": "127.0.0.1:9100"}
    s = resolve(MasterSettings, {}, env, "POOLFLEET_MASTER_")
    assert (s.prefetch, s.metrics, s.clients) == (0, "127.0.0.1:9100", "tcp://127.0.0.1:5555")
    # liveness intervals to notice the old master gone, one more, and a worker's longest backoff
    assert s.grace_s == s.heartbeat_interval_s * (s.liveness + 1) + WORKER_RECONNECT_MAX_S
    with pytest.raises(ConfigError, match="journal_sync"):
        resolve(MasterSettings, {"journal_sync": "sometimes"}, {}, "POOLFLEET_MASTER_")
    with pytest.raises(ConfigError, match="heartbeat_interval_s must be positive"):
        resolve(MasterSettings, {}, {"POOLFLEET_MASTER_HEARTBEAT_INTERVAL_S": "0"}, "POOLFLEET_MASTER_")
