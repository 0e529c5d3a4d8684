"""Adapter registry on both object store backends: versions, manifest-last, fencing, idempotency, import."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from fleet import keys
from fleet.exceptions import CancelRequested, FencedOut, InvalidRequest, NotFound
from fleet.jobs import JobError, JobStatus
from fleet.peft_format import validate_peft_adapter_dir
from fleet.queue import JobStore
from fleet.registry import (
    MANIFEST_FILE,
    AdapterRegistry,
    adapter_name_for_job,
    parse_adapter_ref,
    validate_adapter_name,
)

FAR_FUTURE_MS = 10**13
MODULES = ["q_proj", "v_proj"]


def make_peft_dir(path: Path, *, r: int = 4, seed: int = 0, targets=MODULES, config_overrides=None) -> Path:
    """A small PEFT-layout LoRA adapter written with the real safetensors writer."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(2):
        for module in targets:
            base = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{base}.lora_A.weight"] = rng.standard_normal((r, 16)).astype(np.float32)
            tensors[f"{base}.lora_B.weight"] = rng.standard_normal((16, r)).astype(np.float32)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": targets,
        "base_model_name_or_path": "tiny-llama",
        "task_type": "CAUSAL_LM",
        **(config_overrides or {}),
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture
def jobs(r) -> JobStore:
    return JobStore(r, max_attempts=3)


@pytest.fixture
def registry(r, object_store) -> AdapterRegistry:
    return AdapterRegistry(r, object_store)


def _running_job(jobs: JobStore, tenant: str = "t1"):
    jobs.create_job(tenant, model="tiny-llama", training_file="file-x")
    return jobs.leases.claim_next_job("w", 60_000)


FIELDS = {
    "base_model": "tiny-llama",
    "lora_config": {"r": 4, "alpha": 8},
    "hyperparameters": {"n_epochs": 1},
    "dataset": {"file_id": "file-x", "sha256": "ab" * 32},
    "final_metrics": {"train_loss": 1.25},
}


def test_publish_allocates_versions_and_writes_a_verifiable_manifest(jobs, registry, object_store, tmp_path):
    refs = []
    for i in range(2):
        claim = _running_job(jobs)
        src = make_peft_dir(tmp_path / f"out{i}", seed=i)
        refs.append(
            registry.publish_adapter_version(
                "t1", "support-bot", src, FIELDS, fence=claim.fence
            )
        )
    assert refs == ["support-bot:v1", "support-bot:v2"]
    manifest = registry.read_manifest("t1", "support-bot:v2")
    assert (manifest.base_model, manifest.job_id, manifest.final_metrics) == (
        "tiny-llama",
        claim.job.id,
        {"train_loss": 1.25},
    )
    assert manifest.dataset["file_id"] == "file-x"
    prefix = "tenants/t1/adapters/support-bot/v2/"
    w = claim.fence.writer  # a<attempt>-<token>: the publishing claim's own folder
    assert w == f"a1-{claim.fence.token[:12]}"
    assert sorted(object_store.list(prefix)) == sorted(  # the files under the publishing attempt's own prefix
        [prefix + f"{w}/adapter_config.json", prefix + f"{w}/adapter_model.safetensors", prefix + MANIFEST_FILE]
    )
    assert sorted((e.path, e.key) for e in manifest.files) == [
        ("adapter_config.json", f"{w}/adapter_config.json"),
        ("adapter_model.safetensors", f"{w}/adapter_model.safetensors"),
    ]
    for entry in manifest.files:
        data = object_store.get_bytes(prefix + entry.key)
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (entry.sha256, entry.size)
    assert [v.version for v in registry.list_versions("t1", "support-bot")] == [2, 1]
    assert registry.get_version("t1", "support-bot").ref == "support-bot:v2"  # bare name = latest
    (summary,) = registry.list_adapters("t1")
    assert (summary.name, summary.latest_version, summary.n_versions) == ("support-bot", 2, 2)


def test_version_numbers_are_unique_under_concurrent_publishes(jobs, registry, tmp_path):
    claims = [_running_job(jobs) for _ in range(6)]
    src = make_peft_dir(tmp_path / "out")
    refs, errors = [], []

    def publish(claim):
        try:
            refs.append(
                registry.publish_adapter_version("t1", "a", src, FIELDS, fence=claim.fence)
            )
        except Exception as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=publish, args=(c,)) for c in claims]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(refs) == [f"a:v{n}" for n in range(1, 7)]


def test_publish_is_idempotent_per_job_and_a_stale_attempt_cannot_publish(jobs, registry, object_store, tmp_path):
    first = _running_job(jobs)
    job_id = first.job.id
    jobs.leases.requeue_expired_leases(now_ms=FAR_FUTURE_MS)  # the first worker is presumed dead
    second = jobs.leases.claim_next_job("w2", 60_000)
    src = make_peft_dir(tmp_path / "out")
    with pytest.raises(FencedOut):
        registry.publish_adapter_version("t1", "a", src, FIELDS, fence=first.fence)
    ref = registry.publish_adapter_version("t1", "a", src, FIELDS, fence=second.fence)
    again = registry.publish_adapter_version("t1", "a", src, FIELDS, fence=second.fence)
    assert ref == again == "a:v1"
    assert registry.published_version(job_id) == "a:v1"
    # the publisher dies before finishing the job; the next attempt publishes again: still one version
    jobs.leases.requeue_expired_leases(now_ms=FAR_FUTURE_MS)
    third = jobs.leases.claim_next_job("w3", 60_000)
    assert registry.publish_adapter_version("t1", "a", src, FIELDS, fence=third.fence) == "a:v1"
    assert [v.ref for v in registry.list_versions("t1", "a")] == ["a:v1"]
    assert object_store.list("tenants/t1/adapters/a/") == [
        f"tenants/t1/adapters/a/v1/{n}"
        for n in (f"{second.fence.writer}/adapter_config.json", f"{second.fence.writer}/adapter_model.safetensors",
                  MANIFEST_FILE)
    ]


def test_version_without_manifest_is_invisible_and_a_retry_completes_it(jobs, registry, object_store, tmp_path):
    claim = _running_job(jobs)
    src = make_peft_dir(tmp_path / "out")

    def crash_before_manifest(key, data):
        raise RuntimeError("worker died")

    real_put_bytes = object_store.put_bytes
    object_store.put_bytes = crash_before_manifest  # the manifest is the only put_bytes of a publish
    with pytest.raises(RuntimeError):
        registry.publish_adapter_version("t1", "a", src, FIELDS, fence=claim.fence)
    object_store.put_bytes = real_put_bytes
    assert object_store.exists(f"tenants/t1/adapters/a/v1/{claim.fence.writer}/adapter_model.safetensors")
    with pytest.raises(NotFound):
        registry.get_version("t1", "a:v1")
    assert registry.list_adapters("t1") == []
    ref = registry.publish_adapter_version("t1", "a", src, FIELDS, fence=claim.fence)
    assert ref == "a:v1" and registry.read_manifest("t1", ref).version == 1


def _take_over_and_publish(jobs, registry, src: Path) -> str:
    """The first attempt's lease expires; a second attempt claims the job, publishes `src` and succeeds."""
    jobs.leases.requeue_expired_leases(now_ms=FAR_FUTURE_MS)
    second = jobs.leases.claim_next_job("w2", 60_000)
    ref = registry.publish_adapter_version("t1", "a", src, FIELDS, fence=second.fence)
    jobs.leases.finish_job(second.fence, "succeeded", fine_tuned_model=ref)
    return ref


def test_a_stale_attempt_stalled_mid_upload_cannot_change_the_published_version(
    jobs, registry, object_store, tmp_path
):
    first = _running_job(jobs)
    stale, fresh = make_peft_dir(tmp_path / "stale", seed=1), make_peft_dir(tmp_path / "fresh", seed=2)
    real_put_file, published = object_store.put_file, []

    def put_file_after_a_stall(key, path):
        # the first attempt passed its ownership check and stalls here (GC pause, slow network) long
        # enough to lose its lease; a new attempt reserves the same version and publishes it in full
        if not published and Path(path).parent == stale and key.endswith(".safetensors"):
            published.append(_take_over_and_publish(jobs, registry, fresh))
        real_put_file(key, path)

    object_store.put_file = put_file_after_a_stall
    with pytest.raises(FencedOut):
        registry.publish_adapter_version("t1", "a", stale, FIELDS, fence=first.fence)
    assert published == ["a:v1"]
    dest = registry.download_version("t1", "a:v1", tmp_path / "dl")  # checks every sha256 and size
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (dest / name).read_bytes() == (fresh / name).read_bytes()
    assert registry.read_manifest("t1", "a:v1").attempt == 2


def test_a_stale_attempt_writing_its_manifest_late_leaves_the_published_bytes_unchanged(
    jobs, registry, object_store, tmp_path
):
    first = _running_job(jobs)
    stale, fresh = make_peft_dir(tmp_path / "stale", seed=1), make_peft_dir(tmp_path / "fresh", seed=2)
    manifest_key = "tenants/t1/adapters/a/v1/" + MANIFEST_FILE
    real_put_bytes, published = object_store.put_bytes, {}

    def put_bytes_after_a_stall(key, data):
        # the first attempt stalls just before writing manifest.json while a second one publishes
        if key == manifest_key and not published:
            published["ref"] = None  # only the first call stalls
            published["ref"] = _take_over_and_publish(jobs, registry, fresh)
            published["manifest"] = object_store.get_bytes(manifest_key)
        real_put_bytes(key, data)

    object_store.put_bytes = put_bytes_after_a_stall
    ref = registry.publish_adapter_version("t1", "a", stale, FIELDS, fence=first.fence)
    assert ref == published["ref"] == "a:v1"
    assert object_store.get_bytes(manifest_key) == published["manifest"]  # the version never changed
    registry.download_version("t1", "a:v1", tmp_path / "dl")  # checks every sha256 and size
    assert [v.ref for v in registry.list_versions("t1", "a")] == ["a:v1"]


def test_publish_refuses_while_a_cancel_is_pending_and_reserves_nothing(jobs, registry, object_store, r, tmp_path):
    claim = _running_job(jobs)
    jobs.request_cancel("t1", claim.job.id)  # after training ended, before publishing
    src = make_peft_dir(tmp_path / "out")
    with pytest.raises(CancelRequested):
        registry.publish_adapter_version("t1", "a", src, FIELDS, fence=claim.fence)
    assert not r.exists(keys.job_publication(claim.job.id), keys.adapter_version_seq("t1", "a"))
    assert object_store.list("tenants/t1/") == []
    assert jobs.leases.finish_job(claim.fence, "cancelled").status == "cancelled"
    claim = _running_job(jobs)  # the number was not used up
    ref = registry.publish_adapter_version("t1", "a", src, FIELDS, fence=claim.fence)
    assert ref == "a:v1"


def test_a_cancel_arriving_during_the_upload_keeps_the_version_unpublished(jobs, registry, object_store, tmp_path):
    claim = _running_job(jobs)
    src = make_peft_dir(tmp_path / "out")
    real_put_file = object_store.put_file

    def cancel_during_last_upload(key, path):
        real_put_file(key, path)
        if key.endswith(".safetensors"):  # the last file: only the commit is left
            jobs.request_cancel("t1", claim.job.id)

    object_store.put_file = cancel_during_last_upload
    with pytest.raises(CancelRequested):
        registry.publish_adapter_version("t1", "a", src, FIELDS, fence=claim.fence)
    assert registry.published_version(claim.job.id) is None
    assert registry.list_adapters("t1") == []
    assert not object_store.exists("tenants/t1/adapters/a/v1/" + MANIFEST_FILE)


def test_download_and_archives_hold_the_peft_files(jobs, registry, tmp_path):
    claim = _running_job(jobs)
    src = make_peft_dir(tmp_path / "out")
    ref = registry.publish_adapter_version("t1", "a", src, FIELDS, fence=claim.fence)
    dest = registry.download_version("t1", ref, tmp_path / "dl")
    assert (dest / "adapter_model.safetensors").read_bytes() == (src / "adapter_model.safetensors").read_bytes()
    validate_peft_adapter_dir(dest)

    buf = io.BytesIO()
    assert registry.write_archive("t1", ref, buf, "tar.gz") == "a-v1.tar.gz"
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tar:
        assert sorted(tar.getnames()) == [
            "a-v1/adapter_config.json",
            "a-v1/adapter_model.safetensors",
            "a-v1/manifest.json",
        ]
    buf = io.BytesIO()
    registry.write_archive("t1", ref, buf, "zip")
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        assert zf.read("a-v1/adapter_config.json") == (src / "adapter_config.json").read_bytes()


def test_other_tenant_sees_nothing_and_soft_delete_hides_a_version(jobs, registry, object_store, tmp_path):
    src = make_peft_dir(tmp_path / "out")
    refs = []
    for _ in range(2):
        claim = _running_job(jobs)
        refs.append(
            registry.publish_adapter_version("t1", "a", src, FIELDS, fence=claim.fence)
        )
    with pytest.raises(NotFound):
        registry.read_manifest("t2", "a:v1")
    with pytest.raises(NotFound):
        registry.list_versions("t2", "a")
    registry.delete_version("t1", "a:v2")
    with pytest.raises(NotFound):
        registry.get_version("t1", "a:v2")
    assert registry.get_version("t1", "a").ref == "a:v1"
    assert object_store.exists("tenants/t1/adapters/a/v2/manifest.json")  # soft: bytes kept
    claim = _running_job(jobs)
    assert (
        registry.publish_adapter_version("t1", "a", src, FIELDS, fence=claim.fence) == "a:v3"
    )  # numbers never reused
    registry.delete_adapter("t1", "a")
    assert registry.list_adapters("t1") == []


def test_import_from_directory_and_archives(registry, tmp_path):
    src = make_peft_dir(tmp_path / "mine")
    v1 = registry.import_adapter("t1", "imported", src)
    tgz = tmp_path / "mine.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(src, arcname="mine")
    v2 = registry.import_adapter("t1", "imported", tgz)
    zpath = tmp_path / "mine.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in src.iterdir():
            zf.write(f, f.name)
    v3 = registry.import_adapter("t1", "imported", zpath, extra_manifest={"imported_filename": "mine.zip"})
    assert [v1.ref, v2.ref, v3.ref] == ["imported:v1", "imported:v2", "imported:v3"]
    manifest = registry.read_manifest("t1", "imported:v3")
    assert {e.key for e in manifest.files} == {"import/adapter_config.json", "import/adapter_model.safetensors"}
    assert manifest.source == "import" and manifest.base_model == "tiny-llama" and manifest.job_id is None
    assert manifest.model_extra["imported_filename"] == "mine.zip"


def test_import_rejects_structurally_broken_adapters(registry, tmp_path):
    cases = {
        "missing weights": lambda p: (p / "adapter_model.safetensors").unlink(),
        "bad config json": lambda p: (p / "adapter_config.json").write_text("{nope"),
        "r mismatch": lambda p: (p / "adapter_config.json").write_text(
            json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": MODULES})
        ),
        "negative r": lambda p: (p / "adapter_config.json").write_text(
            json.dumps({"peft_type": "LORA", "r": -1, "lora_alpha": 16, "target_modules": MODULES})
        ),
        "module not targeted": lambda p: (p / "adapter_config.json").write_text(
            json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})
        ),
        "truncated safetensors": lambda p: (p / "adapter_model.safetensors").write_bytes(
            (p / "adapter_model.safetensors").read_bytes()[:100]
        ),
        "garbage safetensors": lambda p: (p / "adapter_model.safetensors").write_bytes(b"\xff" * 64),
    }
    for i, (case, breakit) in enumerate(cases.items()):
        path = make_peft_dir(tmp_path / f"case{i}")
        breakit(path)
        with pytest.raises(InvalidRequest) as err:
            registry.import_adapter("t1", "x", path)
        assert err.value.param == "adapter", case
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../../escape.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(InvalidRequest, match="unsafe path"):
        registry.import_adapter("t1", "x", evil)
    assert not (tmp_path.parent / "escape.txt").exists()
    assert registry.list_adapters("t1") == []


@pytest.mark.parametrize("name", ["../etc", "a/b", "..", ".hidden", "a b", "", "x" * 97, "a:v1", "ok..no"])
def test_bad_adapter_names_are_rejected_with_a_clear_error(name):
    with pytest.raises(InvalidRequest) as err:
        validate_adapter_name(name)
    assert err.value.param == "name"


def test_adapter_refs_parse():
    assert parse_adapter_ref("support-bot:v12") == ("support-bot", 12)
    assert parse_adapter_ref("support-bot") == ("support-bot", None)
    with pytest.raises(InvalidRequest):
        parse_adapter_ref("a:latest")


def test_adapter_name_for_job_uses_suffix_or_a_sanitised_model_name():
    assert adapter_name_for_job("tiny-llama", "support-bot", "ftjob-0123456789abcdef") == "support-bot"
    assert adapter_name_for_job("meta/llama..3:8b", None, "ftjob-0123456789abcdef") == "meta-llama.3-8b-89abcdef"
    with pytest.raises(InvalidRequest) as err:
        adapter_name_for_job("tiny-llama", "../evil", "ftjob-1")
    assert err.value.param == "suffix"


def test_a_cancel_after_the_commit_lets_the_job_complete_with_its_version(jobs, registry, object_store, tmp_path):
    claim = _running_job(jobs)
    job_id = claim.job.id
    src = make_peft_dir(tmp_path / "out")
    manifest_key = "tenants/t1/adapters/a/v1/" + MANIFEST_FILE
    real_put_bytes, answers = object_store.put_bytes, []

    def cancel_after_the_commit(key, data):
        if key == manifest_key and not answers:  # committed in Redis, manifest.json not yet written
            answers.append(jobs.request_cancel("t1", job_id))
            answers.append(jobs.request_pause("t1", job_id))
        real_put_bytes(key, data)

    object_store.put_bytes = cancel_after_the_commit
    ref = registry.publish_adapter_version("t1", "a", src, FIELDS, fence=claim.fence)
    assert [(j.status, j.control) for j in answers] == [(JobStatus.RUNNING, None)] * 2
    done = jobs.leases.finish_job(claim.fence, JobStatus.SUCCEEDED, fine_tuned_model=ref)
    assert (done.status, done.fine_tuned_model) == (JobStatus.SUCCEEDED, "a:v1")
    assert [v.ref for v in registry.list_versions("t1", "a")] == ["a:v1"]
    messages = [e.message for e in jobs.read_events(job_id)]
    assert "Cancel arrived after the adapter was published; the job completes." in messages


def _commit_then_die(jobs, registry, object_store, src: Path, fields=FIELDS):
    """An attempt commits its version in Redis, then dies before writing manifest.json."""
    claim = _running_job(jobs)
    real_put_bytes = object_store.put_bytes

    def crash_before_manifest(key, data):
        raise RuntimeError("worker died")

    object_store.put_bytes = crash_before_manifest  # the manifest is the only put_bytes of a publish
    with pytest.raises(RuntimeError):
        registry.publish_adapter_version("t1", "a", src, fields, fence=claim.fence)
    object_store.put_bytes = real_put_bytes
    return claim


def test_a_version_committed_by_a_dead_attempt_is_completed_by_the_next_without_training(
    jobs, registry, object_store, tmp_path
):
    fields = {**FIELDS, "trained_tokens": 1234, "hyperparameters": {"n_epochs": 2, "learning_rate": 0.001}}
    first = _commit_then_die(jobs, registry, object_store, make_peft_dir(tmp_path / "out"), fields)
    job_id = first.job.id
    assert jobs.request_cancel("t1", job_id).status == JobStatus.RUNNING  # committed: the job completes
    (expired,) = jobs.leases.requeue_expired_leases(now_ms=FAR_FUTURE_MS)
    assert expired.new_status == JobStatus.QUEUED  # not cancelled: the next attempt finishes it
    second = jobs.leases.claim_next_job("w2", 60_000)
    with pytest.raises(FencedOut):
        registry.complete_committed_publication(first.fence)

    done = registry.complete_committed_publication(second.fence)
    assert (done.ref, done.trained_tokens, done.hyperparameters) == ("a:v1", 1234, fields["hyperparameters"])
    finished = jobs.leases.finish_job(
        second.fence, JobStatus.SUCCEEDED, fine_tuned_model=done.ref, trained_tokens=done.trained_tokens
    )
    assert (finished.status, finished.fine_tuned_model, finished.trained_tokens) == ("succeeded", "a:v1", 1234)
    assert registry.read_manifest("t1", "a:v1").attempt == 1  # the committed bytes, not retrained ones
    assert [v.ref for v in registry.list_versions("t1", "a")] == ["a:v1"]

    fresh = _running_job(jobs)
    assert registry.complete_committed_publication(fresh.fence) is None  # nothing committed: train


def test_a_job_with_a_committed_version_can_only_end_succeeded(jobs, registry, object_store, tmp_path):
    first = _commit_then_die(jobs, registry, object_store, make_peft_dir(tmp_path / "out"))
    error = JobError(code="training_error", message="ConnectionError while finishing")
    for status in (JobStatus.FAILED, JobStatus.CANCELLED):  # e.g. a Redis blip after the commit
        handed_back = jobs.leases.finish_job(first.fence, status, error=error)
        assert (handed_back.status, handed_back.error, handed_back.finished_at) == (JobStatus.QUEUED, None, None)
        first = jobs.leases.claim_next_job("w2", 60_000)
    done = registry.complete_committed_publication(first.fence)
    assert jobs.leases.finish_job(first.fence, JobStatus.SUCCEEDED, fine_tuned_model=done.ref).status == "succeeded"
