"""A cancel or pause takes effect within 5 s in every phase of a job, or (once training is done) the job
completes: download, dataset checks, waiting for Ray resources, training, publishing."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.reliability.conftest import Stack, wait_for
from workers.synthetic import write_synthetic_dataset

pytestmark = pytest.mark.slow

EFFECT_S = 5.0
# A resource no node has: Ray Train waits for it forever, as on a cluster whose GPUs are all taken.
UNSATISFIABLE = {"CPU": 1.0, "unobtainium": 1.0}


def _send(stack: Stack, job_id: str, signal: str) -> None:
    jobs = stack.client.fine_tuning.jobs
    (jobs.cancel if signal == "cancel" else jobs.pause)(job_id)


def _signal_in_phase(stack: Stack, signal: str, phase: str, reached: Any, *, file_id: str,
                     allowed: tuple[str, ...]) -> tuple[str, str]:
    """Create a job, wait until `reached(job_id)` says it is in `phase`, send `signal`; return the job id
    and the status it settles in, which must be one of `allowed` within EFFECT_S."""
    job = stack.create_job(n_epochs=1, training_file=file_id, suffix=_suffix(phase, signal))
    wait_for(lambda: reached(job.id), f"job {job.id} to reach the {phase} phase", timeout_s=180, every_s=0.05)
    _send(stack, job.id, signal)
    sent = time.monotonic()
    status = wait_for(lambda: (s := stack.job(job.id).status) in allowed and s,
                      f"the {signal} sent during {phase} to take effect", timeout_s=60, every_s=0.1)
    took_s = time.monotonic() - sent
    assert took_s <= EFFECT_S, f"a {signal} during {phase} took {took_s:.1f}s to end the job {status}"
    return job.id, status


def _suffix(phase: str, signal: str) -> str:
    return f"{phase.replace(' ', '-')}-{signal}"


def _event(stack: Stack, text: str) -> Any:
    return lambda job_id: any(text in m for m in stack.messages(job_id))


def test_cancel_and_pause_take_effect_in_every_phase(fleet_stack, tmp_path):
    stack = fleet_stack(n_train=2000)  # enough examples that checks and training take a while
    small_path = write_synthetic_dataset(tmp_path / "small.jsonl", 12, seed=5)
    small = stack.client.files.create(file=small_path.open("rb"), purpose="fine-tune").id
    effect = {"cancel": "cancelled", "pause": "paused"}

    # A dispatcher whose Train workers can never be placed: its jobs wait for resources forever.
    waiting = stack.start_dispatcher("dispatcher-waiting", train_resources_per_worker=UNSATISFIABLE)
    for signal in ("cancel", "pause"):
        for phase, text in (("download", "Downloading the job's files."),
                            ("checks", "Checking the datasets with"),
                            ("waiting for resources", "on Ray; waiting for resources.")):
            _signal_in_phase(stack, signal, phase, _event(stack, text), file_id=stack.training_file_id,
                             allowed=(effect[signal],))
    waiting.terminate()
    waiting.wait(timeout=60)

    stack.start_dispatcher("dispatcher-training")
    progressed = lambda job_id: ((stack.job(job_id).model_extra or {}).get("progress") or {}).get("step", 0) >= 1  # noqa: E731
    for signal in ("cancel", "pause"):
        job_id, _ = _signal_in_phase(stack, signal, "training", progressed, file_id=stack.training_file_id,
                                     allowed=(effect[signal],))
    assert stack.checkpoint_steps(job_id), "the paused job wrote no checkpoint to resume from"

    for signal in ("cancel", "pause"):
        # Training is over: the job may still stop, or complete (a committed version is kept).
        job_id, status = _signal_in_phase(stack, signal, "publishing", _event(stack, "training succeeded at step"),
                                          file_id=small, allowed=(effect[signal], "succeeded"))
        expected_versions = [1] if status == "succeeded" else []
        assert stack.versions(_suffix("publishing", signal)) == expected_versions, status
        assert (stack.job(job_id).fine_tuned_model is not None) == (status == "succeeded")

    # The runs stopped midway were killed whole: no worker of theirs still holds a CPU.
    import ray

    wait_for(lambda: ray.available_resources().get("CPU") == ray.cluster_resources()["CPU"],
             "every CPU of the Ray cluster to be free again", timeout_s=30, every_s=0.5)
