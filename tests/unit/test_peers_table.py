"""The peers' table (bench/peers/table.py) and its section of the benchmarks page: pure parts,
no peers' environment needed."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from bench import report
from bench.peers import table
from bench.peers.common import PeerResult, Spec

HEADING = table.Heading(
    "make bench-peers", "2026-12-01 12:00 UTC", "2 cores (test cpu), Linux", "CPython 3.11.7"
)


def results() -> list[PeerResult]:
    fleet = PeerResult(
        "poolfleet", "1 worker", {"poolfleet": "0.1.0"}, [26000.0], [0.8], [1.2], [0.87], [0.95]
    )
    rq = PeerResult(
        "RQ",
        "2 workers",
        {"python": "3.11.7", "rq": "2.12.0", "redis (client)": "8.1.0"},
        [85.0],
        [14.0],
        [26.0],
        [0.36],
        [],
        {"io": "one job at a time per worker"},
    )
    return [fleet, rq, table.failed("Ray", "did not finish within 300 s")]


def test_rows_give_figures_and_a_dash_for_what_did_not_run() -> None:
    fleet, rq, ray = table.rows(results())
    assert fleet == ["poolfleet 0.1.0", "26,000", "0.800", "1.200", "0.870", "0.950"]
    assert rq[0] == "RQ 2.12.0" and rq[1:5] == ["85", "14.000", "26.000", "0.360"] and rq[5] == "-"
    assert ray == ["Ray", "-", "-", "-", "-", "-"]


def test_repeats_show_median_and_range() -> None:
    r = PeerResult("Ray", versions={"ray": "2.60.0"}, noop=[100.0, 300.0, 200.0])
    assert table.rows([r])[0][1] == "200 (100-300)"


def test_notes_give_versions_setup_and_every_reason() -> None:
    fleet_note, rq_note, ray_note = table.notes(results())
    assert "RQ 2.12.0: 2 workers" in rq_note and "redis (client) 8.1.0" in rq_note
    assert "io: - (one job at a time per worker)" in rq_note and "noop: -" not in rq_note
    assert ray_note == "Ray. noop, p50, p99, cpu, io: - (did not finish within 300 s)."
    assert fleet_note == "poolfleet 0.1.0: 1 worker (poolfleet 0.1.0)."


def test_section_replaces_only_its_own_part_of_the_page(tmp_path: Path) -> None:
    page = tmp_path / "BENCHMARKS.md"
    bench_part = f"{report.BEGIN}\nbench's own table\n{report.END}"
    page.write_text(
        f"# Benchmarks\n\n{bench_part}\n\n## Peers\n\nprose\n\n{table.BEGIN}\nold\n{table.END}\n\ntail\n"
    )
    first = table.section(results(), HEADING, ["a note"])
    report.write(page, first, table.BEGIN, table.END)
    text = page.read_text()
    assert bench_part in text and "prose" in text and text.endswith("\n\ntail\n")
    assert "old" not in text and "| RQ 2.12.0" in text and "- a note" in text
    assert (
        "Run `make bench-peers` on 2026-12-01 12:00 UTC: 2 cores (test cpu), Linux, CPython 3.11.7." in text
    )
    # a second run replaces the section again, once
    second = table.section(results()[:1], HEADING, [])
    report.write(page, second, table.BEGIN, table.END)
    text = page.read_text()
    assert text.count(table.BEGIN) == 1 and "RQ" not in text and bench_part in text


def test_section_is_appended_to_a_page_without_one(tmp_path: Path) -> None:
    page = tmp_path / "BENCHMARKS.md"
    page.write_text("# Benchmarks\n")
    report.write(page, table.section(results(), HEADING, []), table.BEGIN, table.END)
    text = page.read_text()
    assert text.startswith("# Benchmarks\n\n" + table.BEGIN) and text.rstrip().endswith(table.END)


def test_a_result_survives_its_json_round_trip() -> None:
    r = results()[1]
    assert PeerResult.from_json(json.loads(json.dumps(asdict(r)))) == r
    spec = Spec(5000, 300, 40, 229_000, 200, 0.05, 50, redis_url="redis://127.0.0.1:1")
    assert Spec(**json.loads(json.dumps(asdict(spec)))) == spec


def test_titles_carry_the_systems_own_version_where_known() -> None:
    assert table.title(PeerResult("Celery + Redis", versions={"celery": "5.7.0"})) == "Celery 5.7.0 + Redis"
    assert table.title(PeerResult("Celery + Redis")) == "Celery + Redis"
    assert table.title(PeerResult("local multiprocessing.Pool(2)")) == "local multiprocessing.Pool(2)"
