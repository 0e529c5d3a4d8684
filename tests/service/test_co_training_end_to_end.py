"""Co-training end to end: four tenants' jobs through the API (real uvicorn, Redis, Ray on CPU and a
`lorafleet worker` process) train as ONE group in one process and publish four versions that load
in PEFT; a member cancelled mid-run leaves while the others finish."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.service import test_end_to_end as end_to_end
from tests.service.test_end_to_end import _assert_loads_in_ours_and_peft, _download_version, _finished, _wait_for
from workers.synthetic import write_synthetic_splits

pytestmark = pytest.mark.slow

e2e_stack = end_to_end.e2e  # the `e2e` fixture (an API and `lorafleet worker` processes on the session Ray)
_GROUP = re.compile(r"Co-training with (\d+) other job\(s\) on tiny-llama \(group (\S+)\)")


def _submit(server, tenant_name: str, data: Path, *, r: int, seed: int, n_epochs: int = 1):
    tenant = server.create_tenant(tenant_name)
    client = server.openai(tenant.api_key)
    train = client.files.create(file=data.open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=train.id, suffix=tenant_name, seed=seed,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": n_epochs, "batch_size": 2}}},
        extra_body={"lora": {"r": r, "alpha": 2 * r, "target_modules": ["q_proj", "v_proj"]}},
    )
    return tenant, client, job


def _group_of(client, job_id: str) -> tuple[int, str] | None:
    for event in client.fine_tuning.jobs.list_events(job_id, limit=100).data:
        if match := _GROUP.search(event.message):
            return int(match[1]), match[2]
    return None


def _datasets(tmp_path: Path, n: int, n_train: int) -> list[Path]:
    return [write_synthetic_splits(tmp_path / f"data-{i}", n_train=n_train, n_val=4, seed=20 + i)[0] for i in range(n)]


def test_four_tenants_jobs_co_train_as_one_group_and_publish_four_peft_loadable_versions(e2e_stack, tmp_path,
                                                                                         tiny_model_dir):
    server, dispatchers = e2e_stack(co_training_max_group=4)
    submitted = [_submit(server, f"team-{name}", data, r=r, seed=seed)
                 for name, data, r, seed in zip("abcd", _datasets(tmp_path, 4, 24), (4, 8, 8, 16), (1, 2, 3, 4),
                                                strict=True)]
    dispatchers.start("dispatcher-co")  # after the four are queued: the first one admitted leads the group

    groups = set()
    for (tenant, client, job), name, r in zip(submitted, "abcd", (4, 8, 8, 16), strict=True):
        done = _wait_for(lambda c=client, j=job: _finished(c, j.id), f"co-trained job {job.id} to finish")
        assert done.status == "succeeded", done.error
        assert done.model_extra["attempt"] == 1  # every member's lease stayed alive: none was requeued
        assert done.fine_tuned_model == f"team-{name}:v1"
        assert done.model_extra["lora"]["r"] == r  # each kept its own adapter shape
        membership = _group_of(client, job.id)
        assert membership is not None, f"{job.id} did not train in a group"
        assert membership[0] == 3
        assert not any(j.id in membership[1] for _, _, j in submitted), membership  # names no tenant's job
        groups.add(membership[1])
        version_dir = _download_version(server, tenant.api_key, done.fine_tuned_model, tmp_path / f"dl-{job.id}")
        _assert_loads_in_ours_and_peft(version_dir, tiny_model_dir)
    assert len(groups) == 1, f"the four jobs trained in {len(groups)} groups, not one: {groups}"


def test_a_cancelled_and_a_paused_member_leave_the_group_and_the_others_finish(e2e_stack, tmp_path,
                                                                               tiny_model_dir):
    server, dispatchers = e2e_stack(co_training_max_group=4)
    data = _datasets(tmp_path, 4, 24)
    stays_a = _submit(server, "team-a", data[0], r=4, seed=1)
    cancelled_b = _submit(server, "team-b", data[1], r=4, seed=2, n_epochs=40)  # long enough to be stopped mid-run
    paused_c = _submit(server, "team-c", data[2], r=4, seed=3, n_epochs=40)
    stays_d = _submit(server, "team-d", data[3], r=8, seed=4)
    dispatchers.start("dispatcher-co")

    def training(client, job_id: str) -> bool:
        job = client.fine_tuning.jobs.retrieve(job_id)
        return job.status == "running" and bool((job.model_extra.get("progress") or {}).get("step"))

    for _, client, job in (cancelled_b, paused_c):
        _wait_for(lambda c=client, j=job: training(c, j.id), f"job {job.id} to train in its group")
        assert _group_of(client, job.id) == (3, _group_of(stays_a[1], stays_a[2].id)[1])
    (_, client_b, job_b), (_, client_c, job_c) = cancelled_b, paused_c
    client_b.fine_tuning.jobs.cancel(job_b.id)
    client_c.fine_tuning.jobs.pause(job_c.id)
    cancelled = _wait_for(lambda: _finished(client_b, job_b.id), f"job {job_b.id} to end cancelled")
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    paused = _wait_for(lambda: (j := client_c.fine_tuning.jobs.retrieve(job_c.id)).status == "paused" and j,
                       f"job {job_c.id} to pause", timeout_s=120)
    assert paused.fine_tuned_model is None
    assert client_c.fine_tuning.jobs.checkpoints.list(job_c.id).data, "the pause wrote no checkpoint to resume from"
    for tenant, client, job in (stays_a, stays_d):
        done = _wait_for(lambda c=client, j=job: _finished(c, j.id), f"job {job.id} to finish after the others left")
        assert done.status == "succeeded", done.error
        version_dir = _download_version(server, tenant.api_key, done.fine_tuned_model, tmp_path / f"dl-{job.id}")
        _assert_loads_in_ours_and_peft(version_dir, tiny_model_dir)


def test_a_killed_dispatcher_requeues_every_member_once_and_each_resumes_from_its_checkpoint(e2e_stack, tmp_path):
    import signal

    server, dispatchers = e2e_stack(co_training_max_group=4)
    data = _datasets(tmp_path, 3, 24)
    members = [_submit(server, f"team-{name}", path, r=4, seed=i, n_epochs=6)
               for i, (name, path) in enumerate(zip("abc", data, strict=True))]
    doomed = dispatchers.start("dispatcher-doomed")
    for _, client, job in members:
        _wait_for(lambda c=client, j=job: c.fine_tuning.jobs.checkpoints.list(j.id).data,
                  f"a first checkpoint of co-trained job {job.id}")
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(timeout=10)
    dispatchers.start("dispatcher-rescuer")

    for tenant, client, job in members:
        done = _wait_for(lambda c=client, j=job: _finished(c, j.id), f"rescued job {job.id} to finish", timeout_s=300)
        assert done.status == "succeeded", done.error
        assert done.model_extra["attempt"] == 2  # requeued once by lease expiry, never run twice at once
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=200).data]
        assert any(m.startswith("Resuming from the checkpoint at step") for m in messages), messages
        with server.client(tenant.api_key) as http:
            name = done.fine_tuned_model.split(":")[0]
            versions = http.get(f"/v1/adapters/{name}/versions").json()["data"]
        assert [v["version"] for v in versions] == [1], versions  # published once
