"""bench/sched_sim.py's quick mode runs end to end through the real scheduler, so the script cannot rot;
and its saturated scenario, at small scale, holds the weighted fair share to the issue's bound."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import redis

from bench.local_redis import local_redis
from bench.sched_sim import closed_loop

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


def test_unequal_weights_get_their_weighted_share_at_the_default_half_life():
    """Weights 1:2:3:4, the cluster saturated, the default 1 h half-life: each tenant's GPU-time share is
    within 5 % of weight / sum of weights (issue 10), pooled over three seeded 24 h simulations through
    the real admission script. Ordering heads by consumed / weight alone gave the weight-1 tenant
    +13-17 % here: its jobs are large for its share, and it was admitted each time it dipped below."""
    weights = {"w1": 1.0, "w2": 2.0, "w3": 3.0, "w4": 4.0}
    gpu_ms: Counter = Counter()
    with local_redis() as url:
        client = redis.Redis.from_url(url, decode_responses=True)
        for seed in (0, 1, 2):
            stats = closed_loop(client, weights, 24, random.Random(seed), half_life_s=3600)
            gpu_ms.update(stats.gpu_ms)
        client.close()
    total, weight_sum = sum(gpu_ms.values()), sum(weights.values())
    deviations = {t: gpu_ms[t] / total / (w / weight_sum) - 1 for t, w in weights.items()}
    assert all(abs(d) <= 0.05 for d in deviations.values()), deviations
