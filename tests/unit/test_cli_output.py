"""ptask's rendering of what workers offer (pure helpers of poolfleet.client.output)."""

from __future__ import annotations

from typing import Any

from poolfleet.client.cli import exit_text
from poolfleet.client.output import offered_names, offers_lines


def worker(wid: str, **extra: Any) -> dict[str, Any]:
    return {"worker_id": wid, "host": "h", "pid": 1, "queues": ["default"], "slots": {}, "busy": {}} | extra


def test_offers_are_listed_module_by_module_and_shared_blocks_name_every_worker() -> None:
    same = ["mytasks:square", "mytasks:cube", "poolfleet.worker.builtins:noop"]
    ws = [
        worker("wa", offers=same),
        worker("wb", offers=list(reversed(same))),
        worker("wc", offers=["other:f"]),
    ]
    assert offers_lines(ws) == [
        "wa, wb offer:",
        "  mytasks: cube, square",
        "  poolfleet.worker.builtins: noop",
        "wc offers:",
        "  other: f",
    ]


def test_entries_without_offers_render_nothing_and_odd_values_are_ignored() -> None:
    assert offers_lines([worker("wa"), worker("wb", offers=None), worker("wc", offers="mytasks:x")]) == []
    assert offered_names(worker("wa", offers=["m:f", 3, None, "m:f"])) == ["m:f"]
    assert offered_names(worker("wa", offers={"m:g": {"kind": "cpu"}})) == ["m:g"]
    assert offers_lines([worker("wa", offers=[])]) == ["wa: no tasks"]


def test_exit_text_names_the_code_or_the_signal() -> None:
    assert exit_text("ls", 2) == "ls exited with code 2"
    assert exit_text("sleep", -9) == "sleep was killed by signal 9"
