"""A training worker's inputs come from the object store, into a directory of its own on its node."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.settings import Settings, make_object_store
from workers.job_inputs import StoredInputs, StoredObject, node_work_dir, stored_file
from workers.spec import TrainingSpec
from workers.synthetic import write_synthetic_splits


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def stored(tmp_path: Path, tiny_model_dir: Path) -> tuple[Settings, TrainingSpec, StoredInputs]:
    """A spec checked on the "dispatcher" (with its own paths) and the same inputs as object keys."""
    settings = Settings(data_dir=tmp_path / "store-host")
    store = make_object_store(settings)
    train, val = write_synthetic_splits(tmp_path / "dispatcher", n_train=12, n_val=2, seed=0)
    spec = TrainingSpec(base_model=tiny_model_dir, training_file=train, validation_file=val, n_checkpoints=2)
    store.put_file("tenants/t/files/file-train", train)
    store.put_file("tenants/t/files/file-val", val)
    adapter = {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": b"weights"}
    for name, data in adapter.items():
        store.put_bytes(f"tenants/t/adapters/a/v1/a1-x/{name}", data)
    store.put_bytes("tenants/t/jobs/j/checkpoints/a1-x/step-00000004/trainer_state.json", b"{}")
    inputs = StoredInputs(
        settings=settings,
        spec=spec.model_dump(mode="json", exclude={"training_file", "validation_file"}),
        files={"training_file": stored_file("tenants/t/files/file-train", "training_file", _sha256(train)),
               "validation_file": stored_file("tenants/t/files/file-val", "validation_file", _sha256(val))},
        init_adapter=tuple(StoredObject(f"tenants/t/adapters/a/v1/a1-x/{name}", name) for name in adapter),
        resume_from=(StoredObject("tenants/t/jobs/j/checkpoints/a1-x/step-00000004/trainer_state.json",
                                  "trainer_state.json"),),
    )
    return settings, spec, inputs


def test_a_worker_fetches_every_input_into_its_own_dir_and_gets_the_same_spec(stored, tmp_path):
    _, spec, inputs = stored
    node_dir = tmp_path / "node"

    local, resume_from = inputs.fetch(node_dir)

    assert local.model_dump(exclude={"training_file", "validation_file", "init_adapter"}) == \
        spec.model_dump(exclude={"training_file", "validation_file", "init_adapter"})
    for name in ("training_file", "validation_file", "init_adapter"):
        assert getattr(local, name).is_relative_to(node_dir), name
    assert local.training_file.read_bytes() == spec.training_file.read_bytes()
    assert local.validation_file.read_bytes() == spec.validation_file.read_bytes()
    assert (local.init_adapter / "adapter_model.safetensors").read_bytes() == b"weights"
    assert resume_from is not None and resume_from.is_relative_to(node_dir)
    assert (resume_from / "trainer_state.json").read_text() == "{}"
    assert inputs.n_checkpoints == 2


def test_an_altered_object_is_refused_on_its_sha256(stored, tmp_path):
    settings, _, inputs = stored
    make_object_store(settings).put_bytes("tenants/t/files/file-train", b'{"messages": []}\n')
    with pytest.raises(RuntimeError, match="does not match its sha256"):
        inputs.fetch(tmp_path / "node")


def test_stored_inputs_carry_no_path_of_the_dispatcher(stored):
    settings, spec, inputs = stored
    with pytest.raises(ValueError, match="training_file is a path"):
        StoredInputs(settings=settings, spec=spec.model_dump(mode="json"), files=inputs.files)


def test_each_worker_gets_a_fresh_dir_under_its_nodes_temp_dir_and_dead_workers_dirs_go(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "node-tmp"))
    (tmp_path / "node-tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    first, second = node_work_dir("job-1-attempt-1", 0), node_work_dir("job-1-attempt-1", 0)
    assert first != second
    assert first.parent == second.parent == tmp_path / "node-tmp" / "lorafleet-work"

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = first.parent / f"job-0-attempt-1-rank0-pid{dead.pid}-abc_12"  # its worker was SIGKILLed
    (orphan / "inputs").mkdir(parents=True)
    third = node_work_dir("job-1-attempt-1", 1)
    assert not orphan.exists()
    assert first.exists() and second.exists() and third.exists()  # this process's own are alive
