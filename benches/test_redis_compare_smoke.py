"""Smoke tests of benches/redis_compare.py: every measurement on tiny sizes, in process (plus one
through a child process), the table and the RESULTS.md section; and of benches/score_rank_time.py
on a queue it filled. A few seconds; no node needed."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis_compare
from redis_compare import END_MARKER, START_MARKER, _child, _fill, combine, redis_server, render, run_python

BENCHES = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")

TASKS = (
    "enqueue",
    "batch_enqueue",
    "dequeue+ack",
    "dequeue+delete",
    "dispatcher",
    "dispatcher+RedisThrottle",
    "consume",
)


def test_every_measurement_runs_and_counts_what_it_did() -> None:
    with redis_server("everysec") as port:
        url = f"redis://127.0.0.1:{port}/0"
        for i, task in enumerate(TASKS):
            queue = f"smoke-{i}"
            if task.startswith(("dequeue", "dispatcher")):
                asyncio.run(_fill(port, queue, 30))
            result = asyncio.run(_child(task, url, queue, 30, time.time()))
            assert result["count"] == 30, task
            assert result["finished"] >= result["started"]
            if task == "consume":
                assert 0 < result["p50_us"] <= result["p99_us"]
        through_a_child = run_python("batch_enqueue", port, "smoke-child", 50, 1)
        assert through_a_child["count"] == 50
        assert through_a_child["per_second"] > 0


def test_processes_are_combined_over_the_whole_wall_time() -> None:
    combined = combine(
        [{"count": 10, "started": 0.0, "finished": 1.0}, {"count": 30, "started": 0.5, "finished": 2.0}]
    )
    assert combined == {"count": 40, "seconds": 2.0, "per_second": 20.0}


def test_the_results_section_is_replaced_in_place(tmp_path: Path) -> None:
    report: dict[str, Any] = {
        "rows": [
            {"name": "enqueue", "processes": 1, "per_second": 1234.5},
            {
                "name": "limiter consume",
                "processes": 1,
                "per_second": 5000.0,
                "p50_us": 150.0,
                "p99_us": 300.0,
            },
        ],
        "notes": ["BullMQ skipped: node or npm not found on PATH"],
        "environment": {
            "date": "d",
            "nproc": "2",
            "cpu": "c",
            "python": "3",
            "redis_py": "8",
            "redis_server": "7",
            "node": None,
            "bullmq": None,
        },
        "command": "python benches/redis_compare.py",
        "messages": 100,
        "fsync": "everysec",
    }
    section = render(report)
    assert "| enqueue | 1,234 |" in section
    assert "p50 150 µs" in section
    assert "BullMQ skipped" in section
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nearlier\n")
    redis_compare.write_results(section, path)
    redis_compare.write_results(section.replace("1,234", "4,321"), path)
    text = path.read_text()
    assert text.count(START_MARKER) == text.count(END_MARKER) == 1
    assert "4,321" in text
    assert "earlier" in text


def test_the_global_choice_measurements_run_and_fill_their_section(tmp_path: Path) -> None:
    """--global on tiny sizes: the global and buffered dispatchers each take every message, the
    server figures come out, and the section is written between its own markers."""
    with redis_server("everysec") as port:
        url = f"redis://127.0.0.1:{port}/0"
        for task in ("global", "global worker", "global score", "buffered"):
            queue = f"smoke-{task.replace(' ', '-')}"
            asyncio.run(_fill(port, queue, 40, redis_compare.TENANTS))
            assert asyncio.run(_child(task, url, queue, 40, time.time()))["count"] == 40, task
        server = asyncio.run(redis_compare._server_figures(port, 500))
        server["scripts"] = redis_compare.script_figures(port, server["queue"], 40)
        server.update(asyncio.run(redis_compare._score_server_figures(port, 500, dispatches=20)))
    assert server["bytes_per_message"] > server["index_bytes_per_message"] > 0
    assert server["score_dispatch_us"] > 0
    assert server["score_index_bytes_per_message"] > 0
    scripts = server["scripts"]
    assert scripts["dispatch_us"] > 0
    assert scripts["mark_us"] > 0
    assert scripts["dispatch16_us_per_job"] > 0
    # The 16 marks made together go in one call.
    assert scripts["mark16_calls_per_job"] == pytest.approx(1 / 16)
    report: dict[str, Any] = {
        "rows": [{"name": "global dispatch+mark", "processes": 1, "per_second": 999.0}],
        "notes": [],
        "server": server,
        "environment": {
            "date": "d",
            "nproc": "2",
            "cpu": "c",
            "python": "3",
            "redis_py": "8",
            "redis_server": "7",
            "node": None,
            "bullmq": None,
        },
        "command": "python benches/redis_compare.py --global",
        "messages": 40,
        "fsync": "everysec",
    }
    section = redis_compare.render_global(report)
    assert "| global dispatch+mark | 999 |" in section
    assert "The score policy" in section
    assert "| 16 marks made together, µs per job |" in section
    path = tmp_path / "RESULTS.md"
    path.write_text(f"# Results\n\n{START_MARKER}\nother\n{END_MARKER}\n")
    redis_compare.write_global_results(section, path)
    redis_compare.write_global_results(section.replace("| 999 |", "| 111 |"), path)
    text = path.read_text()
    assert text.count(redis_compare.GLOBAL_START) == text.count(redis_compare.GLOBAL_END) == 1
    assert "| 111 |" in text
    assert "other" in text


def test_the_score_ranking_alone_is_timed_on_a_filled_queue_and_reused_queues_are_not_refilled() -> None:
    """score_rank_time.py on a queue `_score_server_figures` filled, and a second call of the
    latter on that queue takes from it rather than filling it again."""
    with redis_server("everysec") as port:
        first = asyncio.run(redis_compare._score_server_figures(port, 300, dispatches=10, queue="smoke-rank"))
        again = asyncio.run(redis_compare._score_server_figures(port, 300, dispatches=10, queue="smoke-rank"))
        assert first["score_dispatch_us"] > 0
        assert again["score_dispatch_us"] > 0
        url = f"redis://127.0.0.1:{port}/0"
        counts = asyncio.run(_count(url, "smoke-rank"))
        assert counts == 300 - 20
        script = str(BENCHES / "score_rank_time.py")
        done = subprocess.run(
            [sys.executable, script, "--port", str(port), "--queue", "smoke-rank",
             "--build", str(BENCHES.parent), "--calls", "3"],
            capture_output=True, text=True, check=True, timeout=120,
        )  # fmt: skip
    assert "ranking" in done.stdout
    assert "winner 0" in done.stdout


async def _count(url: str, queue: str) -> int:
    from llm_queue_dispatcher.redis import RedisStorage

    storage: RedisStorage[Any] = RedisStorage(url, queue)
    async with storage:
        return await storage.get_approximate_message_count()


def test_a_fresh_queue_is_filled_once_and_dispatched_from_round_after_round() -> None:
    """score_rank_time.py --fresh: each round dispatches from the queue filled by the first (the
    manual clock going on where the last round stopped), then the ranking alone is timed."""
    with redis_server("everysec") as port:
        script = str(BENCHES / "score_rank_time.py")
        done = subprocess.run(
            [sys.executable, script, "--port", str(port), "--queue", "smoke-fresh",
             "--build", str(BENCHES.parent), "--fresh", "400", "--rounds", "2", "--dispatches", "10",
             "--calls", "3"],
            capture_output=True, text=True, check=True, timeout=300,
        )  # fmt: skip
        url = f"redis://127.0.0.1:{port}/0"
        left = asyncio.run(_count(url, "smoke-fresh"))
    assert done.stdout.count("dispatch script") == 2
    assert "winner 0" in done.stdout
    assert left == 400 - 2 * 11  # each round's first dispatch is not timed
