"""bench/sched_sim.py's quick mode runs end to end through the real scheduler, so the script cannot rot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 240


def test_the_scheduler_simulation_runs_every_scenario_in_quick_mode():
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "sched_sim.py"), "--quick"], cwd=ROOT,
                         capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    out = run.stdout
    jain = float(re.search(r"Jain's index ([0-9.]+)", out).group(1))
    assert 0 < jain <= 1
    assert out.count("largest deviation") == 2
    assert re.search(r"utilization while jobs wait [0-9.]+", out)
    assert re.search(r"holds its 32 GPUs after \d+ s", out)
    assert re.search(r"10 tenants: 1,000 queued [0-9.]+ / [0-9.]+ ms", out)
