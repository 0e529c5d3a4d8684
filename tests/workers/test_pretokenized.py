"""Tokenize once: the dispatcher's check stores the examples it tokenized, every rank reads them instead
of tokenizing again, and what the ranks train on is exactly what they would have tokenized."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import workers.loop
from fleet.queue import JobStore
from fleet.settings import Settings, make_object_store, make_redis
from workers.datasets import read_examples, validate_dataset
from workers.input_staging import check_and_store_datasets
from workers.loop import Runtime, _setup_data
from workers.packing import DataPosition, make_batches
from workers.pretokenized import (
    PretokenizedMismatch,
    key_for,
    read_pretokenized,
    write_pretokenized,
)
from workers.reporting import ListReporter
from workers.spec import TrainingSpec
from workers.synthetic import write_synthetic_dataset
from workers.tokenization import tokenize_dataset


@pytest.fixture
def data(tmp_path) -> dict[str, Path]:
    return {
        "training_file": write_synthetic_dataset(tmp_path / "train.jsonl", 24, seed=0),
        "validation_file": write_synthetic_dataset(tmp_path / "validation.jsonl", 4, seed=1),
    }


def _spec(model_dir: Path, data: dict[str, Path], **overrides) -> TrainingSpec:
    return TrainingSpec(
        base_model=model_dir,
        max_seq_len=48,  # short enough that some examples are truncated
        hyperparameters={"n_epochs": 2, "batch_size": 2, "learning_rate": 1e-3},
        **data,
        **overrides,
    )


def _store(spec: TrainingSpec, tokenizer, path: Path, name: str) -> Path:
    examples: list = []
    report = validate_dataset(path, tokenizer=tokenizer, max_seq_len=spec.max_seq_len, examples_out=examples,
                              min_examples=1)
    assert report.ok, report.errors
    key = key_for(path, tokenizer, max_seq_len=spec.max_seq_len, train_on_inputs=spec.train_on_inputs)
    return write_pretokenized(path.with_name(name), examples, key)


def test_the_checks_examples_are_exactly_what_tokenizing_the_file_gives(tiny_model_dir, data, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    spec = _spec(tiny_model_dir, data)
    stored = _store(spec, tokenizer, data["training_file"], "train.tokens.npz")
    expected = tokenize_dataset(read_examples(data["training_file"]), tokenizer, max_seq_len=spec.max_seq_len)
    assert any(e.truncated for e in expected) and any(not e.truncated for e in expected)
    key = key_for(data["training_file"], tokenizer, max_seq_len=spec.max_seq_len, train_on_inputs=False)
    assert read_pretokenized(stored, key) == expected


def test_a_file_made_under_other_settings_is_refused(tiny_model_dir, data, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    spec = _spec(tiny_model_dir, data)
    stored = _store(spec, tokenizer, data["training_file"], "train.tokens.npz")
    with pytest.raises(PretokenizedMismatch, match="max_seq_len"):
        read_pretokenized(stored, key_for(data["training_file"], tokenizer, max_seq_len=64, train_on_inputs=False))
    with pytest.raises(PretokenizedMismatch, match="train_on_inputs"):
        read_pretokenized(stored, key_for(data["training_file"], tokenizer, max_seq_len=48, train_on_inputs=True))
    other = write_synthetic_dataset(tmp_path / "other.jsonl", 24, seed=7)
    with pytest.raises(PretokenizedMismatch, match="dataset_sha256"):
        read_pretokenized(stored, key_for(other, tokenizer, max_seq_len=48, train_on_inputs=False))


def test_a_rank_given_the_file_never_tokenizes_and_gets_the_same_batches(tiny_model_dir, data, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    plain = _spec(tiny_model_dir, data)
    pretokenized = plain.model_copy(update={
        "pretokenized_training_file": _store(plain, tokenizer, data["training_file"], "train.tokens.npz"),
        "pretokenized_validation_file": _store(plain, tokenizer, data["validation_file"], "validation.tokens.npz"),
    })
    runtime = Runtime(rank=1, world_size=2)  # one rank of two: the plan is for both
    tokenized_here = _setup_data(plain, runtime, None, torch.float32)

    def refuse(*args, **kwargs):
        raise AssertionError("a rank given a pre-tokenized file tokenized the dataset")

    monkeypatch.setattr(workers.loop, "tokenize_dataset", refuse)
    monkeypatch.setattr(workers.loop, "read_examples", refuse)
    say = ListReporter()
    read_here = _setup_data(pretokenized, runtime, say, torch.float32)

    assert any("pre-tokenized" in message for _, message in say.logs), say.logs
    assert read_here.train_examples == tokenized_here.train_examples
    assert read_here.val_examples == tokenized_here.val_examples
    assert read_here.hp == tokenized_here.hp and read_here.micro_per_epoch == tokenized_here.micro_per_epoch
    for epoch in range(read_here.hp.n_epochs):
        position = DataPosition(epoch=epoch)
        ours = list(make_batches(read_here.train_examples, position=position, **read_here.batch_args))
        theirs = list(make_batches(tokenized_here.train_examples, position=position, **tokenized_here.batch_args))
        assert len(ours) == len(theirs) > 0
        for a, b in zip(ours, theirs, strict=True):
            assert a.inputs.keys() == b.inputs.keys()
            for name in a.inputs:
                if isinstance(a.inputs[name], torch.Tensor):
                    assert torch.equal(a.inputs[name], b.inputs[name]), name
                else:
                    assert a.inputs[name] == b.inputs[name], name


def test_the_dispatchers_check_stores_the_tokenization_for_the_ranks_and_a_retry_reuses_it(
        redis_server, tiny_model_dir, data, tmp_path):
    settings = Settings(redis_url=redis_server.url, data_dir=tmp_path / "var")
    jobs = JobStore(make_redis(settings))
    jobs.create_job("t1", model="tiny-llama", training_file="file-1", validation_file="file-2")
    job = jobs.leases.claim_next_job("test-worker", lease_ms=60_000).job
    spec = _spec(tiny_model_dir, data)
    store = make_object_store(settings)
    said: list[tuple[str, str]] = []

    stored = check_and_store_datasets(job, spec, store, lambda level, message: said.append((level, message)))

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert set(stored) == {"pretokenized_training_file", "pretokenized_validation_file"}
    for param in ("training_file", "validation_file"):
        dataset, object_ = getattr(spec, param), stored[f"pretokenized_{param}"]
        assert object_.key.startswith(f"tenants/t1/jobs/{job.id}/pretokenized/")  # the job's, not the attempt's
        store.download_file(object_.key, tmp_path / "fetched" / object_.path)
        key = key_for(dataset, tokenizer, max_seq_len=spec.max_seq_len, train_on_inputs=False)
        assert read_pretokenized(tmp_path / "fetched" / object_.path, key) == tokenize_dataset(
            read_examples(dataset), tokenizer, max_seq_len=spec.max_seq_len)
    assert not any("earlier attempt" in message for _, message in said)

    said.clear()
    again = check_and_store_datasets(job, spec, store, lambda level, message: said.append((level, message)))
    assert again == stored
    assert said == [("info", f"{param}: checked and tokenized by an earlier attempt; reusing that.")
                    for param in ("training_file", "validation_file")]
