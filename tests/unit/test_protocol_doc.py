"""docs/PROTOCOL.md stays true to the code: kind bytes, error codes, the worked hex example."""

from __future__ import annotations

import re
from pathlib import Path

from poolfleet.client import cli_map, connection
from poolfleet.common import codec, messages
from poolfleet.common.ids import parse_id
from poolfleet.common.protocol import MAGIC, PROTOCOL_VERSION, ErrorCode, MsgKind
from poolfleet.master.client_api import MAX_SUBMIT_TASKS

DOC = (Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md").read_text()


def test_version_and_magic() -> None:
    assert f"version {PROTOCOL_VERSION}" in DOC.splitlines()[0]
    assert MAGIC.hex(" ") == "50 46 31"
    assert "`50 46 31`" in DOC


def test_kind_table_matches_msgkind() -> None:
    rows = re.findall(r"^\| (\d+) \| `0x([0-9a-f]{2})` \| ([A-Z_]+) \|", DOC, re.MULTILINE)
    table = {name: (int(dec), int(hx, 16)) for dec, hx, name in rows}
    assert table == {k.name: (int(k), int(k)) for k in MsgKind}


def test_every_error_code_is_documented() -> None:
    documented = set(re.findall(r"^\| `([a-z_]+)` \| (?:both|clients|workers|—)", DOC, re.MULTILINE))
    assert documented == {c.value for c in ErrorCode}


def test_submit_task_limit_is_documented_and_the_python_client_stays_under_it() -> None:
    assert f"| tasks in one SUBMIT | {MAX_SUBMIT_TASKS:,} |" in DOC
    assert f"at most {MAX_SUBMIT_TASKS:,} (a longer array" in DOC
    assert connection.SUBMIT_BATCH <= MAX_SUBMIT_TASKS and cli_map.SUBMIT_BATCH <= MAX_SUBMIT_TASKS


def _hex_block(after: str) -> bytes:
    """The hex lines that follow the first line containing ``after``."""
    lines = DOC[DOC.index(after) :].splitlines()[1:]
    out: list[str] = []
    for line in lines:
        if re.fullmatch(r"(?:[0-9a-f]{2} ?)+", line.strip()):
            out.append(line.strip())
        elif out or line.strip() not in ("", "```"):
            break
    return bytes.fromhex(" ".join(out))


def test_worked_submit_example_is_exact() -> None:
    tid = parse_id("0190f1b2-3c4d-7e5f-8a6b-7c8d9e0fa1b2")
    body = {
        "tasks": [{"id": tid, "name": "mytasks:add", "payload": codec.pack_call((2, 3), {})}],
        "wait": True,
        "req": 1,
    }
    frames = messages.encode(MsgKind.SUBMIT, body)
    documented = _hex_block("frame 2 (73 bytes)")
    assert len(frames[2]) == 73
    assert documented == frames[2]
    assert frames[1] == b"\x0a"
    assert messages.decode(frames) == (MsgKind.SUBMIT, body)


def test_worked_submitted_reply_is_exact() -> None:
    tid = parse_id("0190f1b2-3c4d-7e5f-8a6b-7c8d9e0fa1b2")
    frames = messages.encode(MsgKind.SUBMITTED, {"req": 1, "accepted": [tid], "rejected": []})
    assert _hex_block("with this 44-byte body:") == frames[2]
    assert len(frames[2]) == 44
