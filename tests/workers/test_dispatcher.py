"""The dispatcher's pieces without Ray: job → spec, the hyperparameters reported back, and the Reporter
that a Ray rank-0 worker uses to write a job's progress, checkpoints and control into Redis."""

from __future__ import annotations

import pickle
import threading
import time
from pathlib import Path

import pytest

from fleet.checkpoints import download_checkpoint
from fleet.exceptions import NotFound
from fleet.job_spec import Hyperparameters, JobSpec
from fleet.jobs import Job, JobStatus
from fleet.queue import JobStore
from fleet.settings import Settings, make_object_store, make_redis
from workers.dispatcher import Dispatcher, JobReporterFactory, build_training_spec, hyperparameters_used
from workers.spec import AUTO_BASE_LEARNING_RATE


def _job(**fields) -> Job:
    base = {"id": "ftjob-abc", "tenant_id": "t1", "created_at": 0, "model": "tiny-llama",
            "training_file": "file-1", "seed": 5}
    return Job(**{**base, **fields})


def test_job_fields_become_the_training_spec(tiny_model_dir, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("{}\n")
    job = _job(spec=JobSpec(
        hyperparameters={"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 0.5},
        lora={"r": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"],
              "use_rslora": True, "use_dora": False},
        quantization="nf4",
    ))
    spec = build_training_spec(job, base_model=tiny_model_dir, quantization="nf4", work_dir=tmp_path,
                               training_file=train, validation_file=None)
    assert spec.quantization == "nf4" and spec.seed == 5
    assert (spec.lora.r, spec.lora.alpha, spec.lora.use_rslora) == (4, 8.0, True)
    assert spec.lora.target_modules == ["q_proj", "v_proj"]
    hp = spec.hyperparameters
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == (2, "auto", 0.5)

    no_quant = build_training_spec(_job(), base_model=tiny_model_dir, quantization="none", work_dir=tmp_path,
                                   training_file=train, validation_file=None)
    assert no_quant.quantization is None
    assert no_quant.hyperparameters.learning_rate_multiplier == "auto"


def test_reported_hyperparameters_replace_auto_with_the_values_used():
    resolved = {"n_epochs": 3, "batch_size": 4, "learning_rate": 2 * AUTO_BASE_LEARNING_RATE, "warmup_steps": 1}
    used = hyperparameters_used(Hyperparameters(), resolved)
    assert used["n_epochs"] == 3 and used["batch_size"] == 4
    assert used["learning_rate_multiplier"] == pytest.approx(2.0)
    assert used["learning_rate"] == resolved["learning_rate"] and used["warmup_steps"] == 1
    given = hyperparameters_used(Hyperparameters(learning_rate_multiplier=0.5), resolved)
    assert given["learning_rate_multiplier"] == 0.5


@pytest.fixture
def running_job(redis_server, tmp_path):
    settings = Settings(redis_url=redis_server.url, data_dir=tmp_path / "var")
    jobs = JobStore(make_redis(settings))
    created = jobs.create_job("t1", model="tiny-llama", training_file="file-1")
    claim = jobs.leases.claim_next_job("test-worker", lease_ms=60_000)
    assert claim is not None and claim.job.id == created.job.id
    return settings, jobs, claim


def test_reporter_writes_progress_events_and_relays_control(running_job):
    settings, jobs, claim = running_job
    factory = JobReporterFactory(settings, "t1", claim.fence)
    reporter = pickle.loads(pickle.dumps(factory))()  # as Ray ships it to the rank-0 worker

    reporter.metrics(1, {"step": 1, "total_steps": 4, "train_loss": 2.5, "tokens_trained": 100})
    reporter.metrics(2, {"step": 2, "total_steps": 4, "train_loss": 2.0, "tokens_trained": 200})
    job = jobs.load_job(claim.job.id)
    assert (job.progress.step, job.progress.total_steps, job.progress.percent) == (2, 4, 50.0)
    assert job.progress.eta_s is not None and job.trained_tokens == 200
    messages = [e.message for e in jobs.read_events(claim.job.id)]
    assert "Step 2/4, training loss=2.0000" in messages

    assert reporter.control() is None
    jobs.request_pause("t1", claim.job.id)
    assert reporter.control() == "pause"


def test_reporter_uploads_checkpoints_that_a_later_attempt_can_fetch(running_job, tmp_path):
    settings, jobs, claim = running_job
    reporter = JobReporterFactory(settings, "t1", claim.fence)()
    checkpoint = tmp_path / "ckpt"
    (checkpoint / "adapter").mkdir(parents=True)
    (checkpoint / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (checkpoint / "trainer_state.json").write_text('{"step": 3}')

    reporter.checkpoint(3, checkpoint)
    reporter.close()  # the upload runs in the background; close waits for it
    latest = jobs.latest_checkpoint(claim.job.id)
    assert latest.step == 3
    fetched = download_checkpoint(make_object_store(settings), latest.location, tmp_path / "fetched")
    assert (fetched / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights"
    assert (fetched / "trainer_state.json").read_text() == '{"step": 3}'


def test_a_fenced_out_reporter_stops_training_and_writes_nothing(running_job, tmp_path: Path):
    settings, jobs, claim = running_job
    stale = JobReporterFactory(settings, "t1", claim.fence)()
    jobs.leases.finish_job(claim.fence, JobStatus.QUEUED)  # handed back: the attempt is stale
    newer = jobs.leases.claim_next_job("another-worker", lease_ms=60_000)
    assert newer.attempt == claim.attempt + 1

    events_before = jobs.read_events(claim.job.id, limit=1000)
    stale.log("stale attempt still training")  # a log line before it noticed
    stale.metrics(7, {"step": 7, "total_steps": 9, "train_loss": 1.0})
    assert stale.control() == "cancel"
    stale.log("stale attempt after it noticed")
    assert jobs.load_job(claim.job.id).progress is None
    assert jobs.load_job(claim.job.id).status == JobStatus.RUNNING
    assert jobs.read_events(claim.job.id, limit=1000) == events_before  # the job's log is the new attempt's


def test_dispatcher_waits_out_a_redis_outage_and_then_takes_work(redis_server, tmp_path, ray_cluster):

    settings = Settings(redis_url=redis_server.url, data_dir=tmp_path / "var", lease_ms=2000, heartbeat_ms=200)
    dispatcher = Dispatcher(settings, worker_id="outage-test")  # empty catalog: every job is refused
    redis_server.kill()
    thread = threading.Thread(target=dispatcher.run_forever, daemon=True)
    thread.start()
    thread.join(timeout=2.0)
    assert thread.is_alive(), "the dispatcher died with Redis"

    redis_server.start()
    jobs = JobStore(make_redis(settings))
    job = jobs.create_job("t1", model="not-in-catalog", training_file="file-1").job

    def failed() -> bool:
        return jobs.load_job(job.id).status == JobStatus.FAILED

    deadline = time.monotonic() + 30
    while not failed() and time.monotonic() < deadline:
        time.sleep(0.1)
    dispatcher.stop()
    thread.join(timeout=15)
    assert not thread.is_alive()
    finished = jobs.load_job(job.id)
    assert finished.status == JobStatus.FAILED and finished.error.param == "model"
    assert "not-in-catalog" in finished.error.message


def test_a_job_whose_file_was_deleted_fails_on_that_file(redis_server, tmp_path, tiny_model_dir):
    catalog = {"tiny-llama": {"path": str(tiny_model_dir), "quantization": "none", "max_rank": 8}}
    settings = Settings(redis_url=redis_server.url, data_dir=tmp_path / "var", catalog=catalog)
    jobs = JobStore(make_redis(settings))
    job = jobs.create_job("t1", model="tiny-llama", training_file="file-gone").job

    Dispatcher(settings, worker_id="deleted-file-test").step()  # fails before any training: no Ray needed

    failed = jobs.load_job(job.id)
    assert failed.status == JobStatus.FAILED
    assert failed.error.param == "training_file" and "file-gone" in failed.error.message


def test_a_committed_version_is_finished_by_the_next_attempt_without_training(redis_server, tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    from fleet.registry import AdapterRegistry

    settings = Settings(redis_url=redis_server.url, data_dir=tmp_path / "var")
    jobs, store = JobStore(make_redis(settings)), make_object_store(settings)
    registry = AdapterRegistry(make_redis(settings), store)
    job = jobs.create_job("t1", model="tiny-llama", training_file="file-gone").job  # nothing to train on
    first = jobs.leases.claim_next_job("dead-worker", lease_ms=60_000)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": np.ones((2, 8), np.float32),
               f"{prefix}.lora_B.weight": np.zeros((8, 2), np.float32)}, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}')
    resolved = {"n_epochs": 2, "batch_size": 4, "learning_rate": 2e-4}
    manifest_fields = {"base_model": "tiny-llama", "hyperparameters": resolved, "trained_tokens": 777}

    def die_before_manifest(key, data):  # the manifest is the only put_bytes of a publish
        raise RuntimeError("died before manifest.json")

    store.put_bytes = die_before_manifest
    with pytest.raises(RuntimeError):
        registry.publish_adapter_version("t1", "a", adapter, manifest_fields, fence=first.fence)
    jobs.leases.requeue_expired_leases(now_ms=10**13)

    Dispatcher(settings, worker_id="next-attempt").step()  # no Ray, no dataset: the commit decides

    done = jobs.load_job(job.id)
    assert (done.status, done.fine_tuned_model, done.trained_tokens) == (JobStatus.SUCCEEDED, "a:v1", 777)
    assert done.hyperparameters_used == hyperparameters_used(Hyperparameters(), resolved)


def test_a_stale_attempt_cannot_overwrite_the_checkpoint_a_newer_attempt_recorded(running_job, tmp_path):
    settings, jobs, claim = running_job
    stale = JobReporterFactory(settings, "t1", claim.fence)()
    stale.control()  # attempt 1 is alive and well here, then stalls
    jobs.leases.finish_job(claim.fence, JobStatus.QUEUED)
    newer_claim = jobs.leases.claim_next_job("another-worker", lease_ms=60_000)
    newer = JobReporterFactory(settings, "t1", newer_claim.fence)()

    def checkpoint_dir(name: str, weights: bytes) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_model.safetensors").write_bytes(weights)
        return tmp_path / name

    newer.checkpoint(200, checkpoint_dir("new", b"attempt 2"))
    stale.checkpoint(200, checkpoint_dir("old", b"attempt 1"))  # its upload lands late
    newer.close()
    stale.close()

    latest = jobs.latest_checkpoint(claim.job.id)
    assert latest.attempt == newer_claim.attempt
    fetched = download_checkpoint(make_object_store(settings), latest.location, tmp_path / "fetched")
    assert (fetched / "adapter_model.safetensors").read_bytes() == b"attempt 2"
    stored = make_object_store(settings).list(f"tenants/t1/jobs/{claim.job.id}/checkpoints/")
    newer = newer_claim.fence.writer
    assert stored and all(f"/{newer}/" in key for key in stored), stored  # nothing uploaded once fenced


def test_the_reporter_rides_out_a_redis_restart_without_raising_into_training(running_job, redis_server, tmp_path):
    settings, jobs, claim = running_job
    reporter = JobReporterFactory(settings, "t1", claim.fence)()
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "adapter_model.safetensors").write_bytes(b"weights")

    redis_server.kill()
    restart = threading.Timer(6.0, redis_server.start)  # a 6 s outage, as a restart on its AOF takes
    restart.start()
    try:
        reporter.log("during the outage")
        reporter.metrics(1, {"step": 1, "total_steps": 4, "train_loss": 2.5})
        assert reporter.control() is None
        reporter.checkpoint(1, checkpoint)
        reporter.close()  # the record is retried through the outage
    finally:
        restart.join(timeout=30)
    latest = jobs.latest_checkpoint(claim.job.id)
    assert latest is not None and latest.step == 1
    assert jobs.load_job(claim.job.id).status == JobStatus.RUNNING


def test_an_expired_lease_is_reclaimed_by_a_dispatcher_that_is_busy(redis_server, tmp_path):
    settings = Settings(redis_url=redis_server.url, data_dir=tmp_path / "var", lease_ms=1500, heartbeat_ms=300)
    jobs = JobStore(make_redis(settings))
    job = jobs.create_job("t1", model="tiny-llama", training_file="file-1").job
    claim = jobs.leases.claim_next_job("a-dispatcher-that-dies", lease_ms=settings.lease_ms)
    claimed_at = time.monotonic()

    # The other dispatcher's main thread is busy with a job of its own (never calls step()): only its
    # maintenance thread can notice the dead one.
    maintenance = Dispatcher(settings, worker_id="busy").start_maintenance()
    try:
        deadline = claimed_at + settings.lease_ms / 1000 + 3.0
        while jobs.load_job(job.id).status != JobStatus.QUEUED:
            assert time.monotonic() < deadline, "the expired lease was not reclaimed within lease_ms + 3 s"
            time.sleep(0.05)
    finally:
        maintenance.stop()
    assert jobs.load_job(job.id).attempt == claim.attempt
    assert any("Worker lost" in e.message for e in jobs.read_events(job.id))


def test_work_dirs_of_killed_dispatchers_on_this_host_are_swept(redis_server, tmp_path):
    import subprocess
    import sys

    settings = Settings(redis_url=redis_server.url, data_dir=tmp_path / "var")
    start_one = ("import sys, time\nfrom fleet.settings import Settings\nfrom workers.dispatcher import Dispatcher\n"
                 "d = Dispatcher(Settings(data_dir=sys.argv[1]), worker_id=sys.argv[2])\n"
                 "d.start_maintenance()\n(d.work_root / 'job' / 'train.jsonl').parent.mkdir(parents=True)\n"
                 "(d.work_root / 'job' / 'train.jsonl').write_text('{}')\nprint('ready', flush=True)\n"
                 "time.sleep(600)\n")
    procs = {name: subprocess.Popen([sys.executable, "-c", start_one, str(settings.data_dir), name],
                                    stdout=subprocess.PIPE, text=True) for name in ("killed", "alive")}
    try:
        for name, proc in procs.items():
            assert proc.stdout.readline().strip() == "ready", f"dispatcher {name} did not start"
        procs["killed"].kill()
        procs["killed"].wait(timeout=10)
        work = settings.data_dir.resolve() / "work"
        assert (work / "killed" / "job" / "train.jsonl").is_file()

        mine = Dispatcher(settings, worker_id="sweeper")
        mine.start_maintenance().stop()  # runs housekeeping once at start
        assert not (work / "killed").exists(), "the killed dispatcher's work dir is still there"
        assert (work / "alive" / "job" / "train.jsonl").is_file(), "a live dispatcher's work dir was removed"
        assert (work / "sweeper").is_dir()
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait(timeout=10)


# ------------------------------------------------------------------------ with Ray: phases and errors
@pytest.fixture
def ray_job_setup(redis_server, tmp_path, tiny_model_dir):
    """Settings with the tiny model, a JobStore, and a factory of claimed jobs on a real uploaded file."""
    from fleet.files import FileStore
    from workers.synthetic import write_synthetic_splits

    def make(*, lora: dict | None = None, **overrides):
        catalog = {"tiny-llama": {"path": str(tiny_model_dir), "quantization": "none", "max_rank": 8}}
        settings = Settings(redis_url=redis_server.url, data_dir=tmp_path / "var", catalog=catalog,
                            lease_ms=3000, heartbeat_ms=250, **overrides)
        client = make_redis(settings)
        jobs = JobStore(client)
        train, _ = write_synthetic_splits(tmp_path / "data", n_train=24, n_val=4, seed=1)
        files = FileStore(client, make_object_store(settings), max_upload_bytes=settings.max_upload_bytes)
        file = files.create_file("t1", filename="train.jsonl", purpose="fine-tune", content=train.read_bytes())
        spec = JobSpec(hyperparameters={"n_epochs": 1, "batch_size": 4},
                       lora=lora or {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
        job = jobs.create_job("t1", model="tiny-llama", training_file=file.id, seed=1, spec=spec).job
        return settings, jobs, job

    return make


@pytest.mark.slow
def test_a_target_module_the_model_lacks_fails_at_once_without_retries(ray_job_setup, ray_cluster):
    settings, jobs, job = ray_job_setup(lora={"r": 4, "alpha": 8, "target_modules": ["no_such_proj"]},
                                        train_max_failures=2)
    Dispatcher(settings, worker_id="setup-error-test").step()

    failed = jobs.load_job(job.id)
    assert failed.status == JobStatus.FAILED and failed.attempt == 1
    assert failed.error.code == "invalid_training_config", failed.error
    assert "no_such_proj" in failed.error.message and "create a new job" in failed.error.message
    messages = [e.message for e in jobs.read_events(job.id)]
    assert not any("worker group restarted" in m for m in messages), messages


@pytest.mark.slow
@pytest.mark.parametrize("signal", ["cancel", "pause"])
def test_cancel_and_pause_stop_a_job_waiting_for_ray_resources(ray_job_setup, ray_cluster, signal):
    # A resource no node has: the Train worker group waits for it forever, as on a full cluster.
    settings, jobs, job = ray_job_setup(train_resources_per_worker={"CPU": 1, "unobtainium": 1})
    dispatcher = Dispatcher(settings, worker_id=f"waiting-{signal}")
    thread = threading.Thread(target=dispatcher.step, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not any("waiting for resources" in e.message for e in jobs.read_events(job.id)):
        assert time.monotonic() < deadline, "the job never reached the training phase"
        time.sleep(0.1)
    time.sleep(1.0)  # inside fit(), waiting for the worker group's placement group

    (jobs.request_cancel if signal == "cancel" else jobs.request_pause)("t1", job.id)
    requested = time.monotonic()
    expected = JobStatus.CANCELLED if signal == "cancel" else JobStatus.PAUSED
    while jobs.load_job(job.id).status != expected:
        assert time.monotonic() - requested < 5.0, f"the {signal} did not end a job waiting for resources in 5 s"
        time.sleep(0.05)
    thread.join(timeout=15)
    assert not thread.is_alive(), f"the dispatcher did not tear the run down after the {signal}"


@pytest.mark.slow
def test_an_attempt_that_redis_outlasts_is_handed_back_not_failed(redis_server, tmp_path):
    settings = Settings(redis_url=redis_server.url, data_dir=tmp_path / "var", lease_ms=60_000, heartbeat_ms=500)
    jobs = JobStore(make_redis(settings))
    job = jobs.create_job("t1", model="tiny-llama", training_file="file-1").job
    claim = jobs.leases.claim_next_job("outage-worker", lease_ms=settings.lease_ms)

    redis_server.kill()
    # Back after the attempt's first Redis call gave up (its retries last 8.5-17 s, ~12.8 s on
    # average) and while its closing write is still retrying.
    restart = threading.Timer(16.0, redis_server.start)
    restart.start()
    try:
        Dispatcher(settings, worker_id="outage-worker").run_claim(claim)
    finally:
        restart.join(timeout=60)
    after = jobs.load_job(job.id)
    assert after.status == JobStatus.QUEUED, after.error  # to resume from its checkpoint, not failed
    assert after.error is None


def test_a_dispatchers_housekeeping_applies_the_retention_policy(redis_server, tmp_path):
    settings = Settings(redis_url=redis_server.url, data_dir=tmp_path / "var", retention_job_days=1 / 86_400)
    jobs = JobStore(make_redis(settings))
    job = jobs.create_job("t1", model="tiny-llama", training_file="file-1").job
    jobs.request_cancel("t1", job.id)  # finished: indexed for retention at this second
    time.sleep(2.1)  # past retention_job_days (1 s) on the Redis clock, whole seconds

    Dispatcher(settings, worker_id="housekeeper").start_maintenance().stop()  # housekeeping runs once at start

    with pytest.raises(NotFound):
        jobs.get_job("t1", job.id)


# ------------------------------------------------------------------- errors: what hands a job back
def test_a_failover_readonly_reply_counts_as_redis_away_not_a_job_failure(redis_server):
    import redis

    from workers.job_runner import _caused_by_redis_outage

    replica = redis_server.client()
    replica.execute_command("REPLICAOF", "127.0.0.1", "1")  # a replica of nothing: writes answer READONLY
    try:
        with pytest.raises(redis.exceptions.ReadOnlyError) as raised:
            replica.set("k", "v")
    finally:
        replica.execute_command("REPLICAOF", "NO", "ONE")
    wrapped = RuntimeError("training job failed on Ray")
    wrapped.__cause__ = raised.value  # as Ray wraps a worker's error
    assert _caused_by_redis_outage(wrapped)


def test_fleet_clients_retry_a_readonly_reply_until_the_failover_ends(redis_server):
    settings = Settings(redis_url=redis_server.url)
    client = make_redis(settings)
    admin = redis_server.client()
    admin.execute_command("REPLICAOF", "127.0.0.1", "1")
    promote = threading.Timer(1.0, lambda: admin.execute_command("REPLICAOF", "NO", "ONE"))
    promote.start()
    try:
        assert client.set("k", "v")  # retried through the READONLY replies until promoted
    finally:
        promote.join(timeout=10)
    assert client.get("k") == "v"


def _queued_job_on_a_real_file(settings: Settings, tmp_path: Path) -> tuple[JobStore, Job]:
    from fleet.files import FileStore
    from workers.synthetic import write_synthetic_splits

    client = make_redis(settings)
    train, _ = write_synthetic_splits(tmp_path / "data", n_train=24, n_val=4, seed=1)
    files = FileStore(client, make_object_store(settings), max_upload_bytes=settings.max_upload_bytes)
    file = files.create_file("t1", filename="train.jsonl", purpose="fine-tune", content=train.read_bytes())
    jobs = JobStore(client, max_attempts=settings.max_attempts)
    return jobs, jobs.create_job("t1", model="tiny-llama", training_file=file.id, seed=1).job


def test_a_failed_jobs_error_shows_the_tenant_no_server_paths(redis_server, tmp_path):
    import json

    from service.objects import job_object

    catalog = {"tiny-llama": {"path": "/srv/secret/models/x", "quantization": "none", "max_rank": 8}}
    settings = Settings(redis_url=redis_server.url, data_dir=tmp_path / "var", catalog=catalog)
    jobs, job = _queued_job_on_a_real_file(settings, tmp_path)

    Dispatcher(settings, worker_id="leak-test").step()  # the tokenizer load fails, naming the model's path

    failed = jobs.load_job(job.id)
    assert failed.status == JobStatus.FAILED and failed.error.code == "training_error", failed.error
    shown = json.dumps(job_object(failed))
    assert "/srv/" not in shown and "<path>" in failed.error.message, failed.error.message
    assert len(failed.error.message) < 400
    assert "/srv/secret/models/x" in failed.last_failure  # the operator still sees everything


def test_a_tenant_summary_keeps_the_class_and_first_line_without_paths():
    from workers.errors import tenant_summary

    try:
        try:
            raise FileNotFoundError("No such file: '/srv/models/llama/config.json'\nTraceback ... /opt/ray/x.py")
        except FileNotFoundError as inner:
            raise RuntimeError("training job 'j' failed on Ray") from inner
    except RuntimeError as e:
        summary = tenant_summary(e)
    assert summary == ("RuntimeError: training job 'j' failed on Ray "
                       "(caused by FileNotFoundError: No such file: '<path>')")
    assert tenant_summary(ValueError("no answer from http://10.0.0.5:9000/b/k for org/name")) == \
        "ValueError: no answer from <url> for org/name"
    assert len(tenant_summary(ValueError("x" * 5000))) <= 300


def test_an_unreachable_object_store_hands_the_job_back_a_bounded_number_of_times(redis_server, tmp_path,
                                                                                   tiny_model_dir):
    import socket

    catalog = {"tiny-llama": {"path": str(tiny_model_dir), "quantization": "none", "max_rank": 8}}
    settings = Settings(redis_url=redis_server.url, data_dir=tmp_path / "var", catalog=catalog)
    jobs, job = _queued_job_on_a_real_file(settings, tmp_path)  # its file is in the local store
    with socket.socket() as probe:  # a port nothing listens on: every S3 request is refused
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    unreachable = Settings(
        redis_url=redis_server.url, data_dir=tmp_path / "var", catalog=catalog, max_infra_faults=1,
        object_store="s3", s3_bucket="lorafleet", s3_endpoint_url=f"http://127.0.0.1:{closed_port}",
        s3_access_key_id="k", s3_secret_access_key="s")

    Dispatcher(unreachable, worker_id="s3-down").step()  # the download fails: not the job's fault

    handed_back = jobs.load_job(job.id)
    assert handed_back.status == JobStatus.QUEUED and handed_back.error is None, handed_back.error
    assert handed_back.infra_faults == 1 and "EndpointConnectionError" in handed_back.last_failure

    Dispatcher(unreachable, worker_id="s3-down").step()  # one fault more than allowed: the job fails

    failed = jobs.load_job(job.id)
    assert failed.status == JobStatus.FAILED and failed.error.code == "infrastructure_error", failed.error
    assert "2 infrastructure faults" in failed.error.message and "127.0.0.1" not in failed.error.message


def test_only_faults_of_the_machinery_count_as_infrastructure_faults(tmp_path):
    import ray.exceptions

    from fleet.objectstore import LocalObjectStore
    from workers.errors import is_infrastructure_fault

    def wrapped(error: Exception) -> RuntimeError:
        outer = RuntimeError("training job 'j' failed on Ray")
        outer.__cause__ = error
        return outer

    assert is_infrastructure_fault(wrapped(ray.exceptions.NodeDiedError("node gone")))
    assert is_infrastructure_fault(wrapped(ray.exceptions.WorkerCrashedError()))
    store = LocalObjectStore(tmp_path / "objects")
    store.put_bytes("a", b"a file where a folder should be")
    with pytest.raises(OSError) as in_store:  # as a full or failing disk would
        store.put_bytes("a/b", b"v")
    assert is_infrastructure_fault(in_store.value)
    assert not is_infrastructure_fault(OSError("Can't load tokenizer for '/srv/models/x'"))
    assert not is_infrastructure_fault(wrapped(ValueError("bad config")))


def test_a_pause_waits_for_the_training_loops_checkpoint_then_ends_the_job(running_job):
    from workers.job_runner import Heartbeat, _TrainingStop

    settings, jobs, claim = running_job
    settings = settings.model_copy(update={"heartbeat_ms": 100, "pause_grace_s": 30.0})
    reporter = JobReporterFactory(settings, "t1", claim.fence)()
    ended: list[str] = []
    progress_at_start = jobs.load_job(claim.job.id).progress
    with Heartbeat(jobs, claim, settings) as heartbeat:
        stop = _TrainingStop(heartbeat, ended.append,
                             latest_checkpoint=lambda: jobs.latest_checkpoint(claim.job.id),
                             training_started=lambda: jobs.load_job(claim.job.id).progress != progress_at_start,
                             pause_grace_s=settings.pause_grace_s)
        reporter.metrics(10, {"step": 10, "total_steps": 100, "train_loss": 2.0})  # the loop is training
        jobs.request_pause("t1", claim.job.id)
        deadline = time.monotonic() + 10
        while heartbeat.control != "pause":
            assert time.monotonic() < deadline, "the heartbeat never saw the pause"
            time.sleep(0.05)
        waited_until = time.monotonic() + 3.0  # past the 2 s a run gets before its loop has started
        while time.monotonic() < waited_until:
            assert stop() is None, "the pause ended the run before its loop recorded a checkpoint"
            time.sleep(0.1)

        jobs.leases.record_checkpoint(claim.fence, 20, "ckpt/step-20")  # the loop's pause checkpoint

        assert stop() == "pause" and ended == ["pause"]


def test_a_corrupted_checkpoints_decode_errors_are_retried_not_blamed_on_the_spec(tmp_path):
    import json

    from lora_core.exceptions import TargetModulesError
    from workers.ray_train import setup_error_message

    truncated = tmp_path / "trainer_state.json"
    truncated.write_bytes(b'{"global_step": 4')  # a checkpoint cut off mid-write
    with pytest.raises(json.JSONDecodeError) as bad_json:
        json.loads(truncated.read_text())
    truncated.write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(UnicodeDecodeError) as bad_text:
        truncated.read_text(encoding="utf-8")
    assert setup_error_message(bad_json.value) is None
    assert setup_error_message(bad_text.value) is None
    assert setup_error_message(RuntimeError("CUDA out of memory")) is None
    assert setup_error_message(TargetModulesError("matched no linear layer")) == \
        "TargetModulesError: matched no linear layer"


def test_a_heartbeat_says_its_attempt_ended_the_job_itself_and_warns_only_of_a_lease_truly_lost(running_job, caplog):
    """A co-trained member's end is written where it trained while the group keeps every member's heartbeat
    going: its heartbeat then finds the job ended by its own attempt, which is no lost lease."""
    import logging

    from fleet.jobs import JobStatus
    from workers.job_runner import Heartbeat

    settings, jobs, claim = running_job
    settings = settings.model_copy(update={"heartbeat_ms": 50})
    with caplog.at_level(logging.INFO, logger="workers.job_runner"), Heartbeat(jobs, claim, settings) as heartbeat:
        jobs.leases.finish_job(claim.fence, JobStatus.SUCCEEDED, trained_tokens=10)
        assert heartbeat.lost.wait(10), "the heartbeat never noticed the job's end"
    said = [(r.levelname, r.getMessage()) for r in caplog.records if claim.job.id in r.getMessage()]
    assert ("INFO", f"attempt {claim.attempt} of {claim.job.id} ended (succeeded): its heartbeat stops") in said
    assert not [m for level, m in said if level == "WARNING"], said
