"""bench/api_submit.py runs end to end (two API servers, one Redis) in a tiny configuration, so it cannot rot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 180


def test_the_submission_benchmark_compares_both_servers_and_prints_the_ratio():
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "api_submit.py"), "--requests", "10", "--rounds", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert re.search(r"ours \d+ req/s, bare HSET\+RPUSH \d+ req/s: ratio [0-9.]+", run.stdout), run.stdout
