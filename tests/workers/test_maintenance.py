"""The work-dir sweep's rules for owners it cannot check by pid: other hosts and unreadable owner files."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from workers.maintenance import OWNER_FILE, claim_work_dir, sweep_work_dirs


def _work_dir_of_another_host(parent: Path, name: str, age_s: float) -> Path:
    path = parent / name
    path.mkdir(parents=True)
    owner = path / OWNER_FILE
    owner.write_text(json.dumps({"host": "some-other-host", "pid": 1, "started_at": 1.0}))
    then = time.time() - age_s
    os.utime(owner, (then, then))
    return path


def test_a_dir_whose_owner_on_another_host_stopped_refreshing_it_is_removed_after_the_grace(tmp_path):
    mine = claim_work_dir(tmp_path / "me")
    stale = _work_dir_of_another_host(tmp_path, "gone-elsewhere", age_s=3600)
    fresh = _work_dir_of_another_host(tmp_path, "alive-elsewhere", age_s=5)
    unreadable = tmp_path / "garbled"
    unreadable.mkdir()
    (unreadable / OWNER_FILE).write_text("{not json")

    removed = sweep_work_dirs(tmp_path, keep=mine, grace_s=600)

    assert removed == [stale]
    assert fresh.is_dir() and mine.is_dir() and unreadable.is_dir()  # too young to judge by age
    then = time.time() - 3600
    os.utime(unreadable, (then, then))
    assert sweep_work_dirs(tmp_path, keep=mine, grace_s=600) == [unreadable]
