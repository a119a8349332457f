"""CPU use of ``llmqd demo`` at its default settings, read from /proc/<pid>/stat (Linux).

Run from the repository root::

    .venv/bin/python benches/demo_cpu.py                  # one page connected (chromium), 30 s
    .venv/bin/python benches/demo_cpu.py --no-browser     # nobody watching
    .venv/bin/python benches/demo_cpu.py --burst 10000        # with 10,000 more requests waiting
    .venv/bin/python benches/demo_cpu.py --seconds 60 --warmup 10

Starts the demo on a free port with no option but ``--port 0`` (so speed 1, every strategy, the
default limits and workload), optionally opens the page in Debian's headless chromium (as
``tests/test_demo_browser.py`` does, so the server pushes its events to one client), waits
``--warmup`` seconds, then reads the server process's user+system CPU ticks over ``--seconds``
of wall time. Prints the share of one core. The browser's own CPU is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.browser import chromium_page
from tests.demo_process import start_demo


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (fields 14 and 15 of /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def measure(pid: int, warmup: float, seconds: float) -> float:
    time.sleep(warmup)
    cpu_before, wall_before = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    cpu_after, wall_after = cpu_seconds(pid), time.monotonic()
    return (cpu_after - cpu_before) / (wall_after - wall_before)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="measured wall time (default 30)")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring (default 5)")
    parser.add_argument("--no-browser", action="store_true", help="measure with no page connected")
    parser.add_argument("--burst", type=int, default=0, help="requests to inject first (at most 20000)")
    args = parser.parse_args()
    with start_demo() as demo:
        if args.burst:
            request = urllib.request.Request(
                demo.url + "api/burst",
                data=json.dumps({"size": args.burst}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                response.read()
        if args.no_browser:
            share = measure(demo.process.pid, args.warmup, args.seconds)
        else:
            with chromium_page() as page:
                page.goto(demo.url)
                page.wait_for_selector("#connection.up", timeout=10_000)
                share = measure(demo.process.pid, args.warmup, args.seconds)
    watching = "no page connected" if args.no_browser else "one page connected (headless chromium)"
    extra = f", {args.burst} more requests injected" if args.burst else ""
    print(f"llmqd demo, default settings{extra}, {watching}: {share:.1%} of one core over {args.seconds:g} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
