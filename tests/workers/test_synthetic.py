"""Synthetic task datasets: deterministic, correct, valid, disjoint splits, and learnable by the tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.datasets import read_examples, validate_dataset
from workers.packing import make_batches
from workers.synthetic import TASKS, main, make_synthetic_examples, write_synthetic_dataset, write_synthetic_splits
from workers.tokenization import IGNORE_INDEX, tokenize_dataset


def _turns(example: dict) -> tuple[str, str]:
    messages = example["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    return messages[1]["content"], messages[2]["content"]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_is_deterministic_and_follows_its_rule(task):
    examples = make_synthetic_examples(50, seed=3, task=task)
    assert examples == make_synthetic_examples(50, seed=3, task=task)
    assert examples != make_synthetic_examples(50, seed=4, task=task)
    rule = {
        "reverse": lambda q: " ".join(reversed(q.split())),
        "sort": lambda q: " ".join(map(str, sorted(map(int, q.split())))),
        "uppercase": str.upper,
        "first_last": lambda q: f"{q.split()[0]} {q.split()[-1]}",
    }[task]
    for example in examples:
        question, answer = _turns(example)
        assert answer == rule(question)


def test_splits_are_valid_files_that_share_no_example(tmp_path):
    train, val = write_synthetic_splits(tmp_path, n_train=40, n_val=12, seed=0, task="sort")
    assert validate_dataset(train).ok and validate_dataset(val).ok
    train_questions = {_turns(e)[0] for e in read_examples(train)}
    val_questions = {_turns(e)[0] for e in read_examples(val)}
    assert len(train_questions) == 40 and len(val_questions) == 12
    assert not train_questions & val_questions


def test_the_command_line_writes_the_splits(tmp_path):
    main([str(tmp_path / "out"), "--task", "uppercase", "--n-train", "20", "--n-val", "5", "--seed", "1"])
    lines = (tmp_path / "out" / "train.jsonl").read_text().splitlines()
    assert len(lines) == 20 and json.loads(lines[0]) == make_synthetic_examples(25, seed=1, task="uppercase")[0]
    assert write_synthetic_dataset(tmp_path / "x.jsonl", 3, seed=1).read_text().count("\n") == 3


def test_unknown_task_names_the_choices():
    with pytest.raises(ValueError, match="reverse"):
        make_synthetic_examples(1, seed=0, task="translate")


def test_the_tiny_model_learns_the_task_quickly(tiny_model_dir):
    """30 full-model steps on 2 CPU cores cut the validation loss by more than a third."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = make_synthetic_examples(140, seed=0, task="reverse")
    train = tokenize_dataset(examples[:120], tokenizer, max_seq_len=128)
    val = tokenize_dataset(examples[120:], tokenizer, max_seq_len=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def summed_loss(inputs):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        logits = model(**inputs, use_cache=False).logits
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )

    def val_loss() -> float:
        with torch.no_grad():
            batches = list(make_batches(val, block_len=256, batch_size=8, pad_id=0, seed=0, shuffle=False))
            return sum(summed_loss(b.inputs).item() for b in batches) / sum(b.n_loss_tokens for b in batches)

    before = val_loss()
    for step, batch in enumerate(make_batches(train, block_len=128, batch_size=1, pad_id=0, seed=0)):
        if step == 30:
            break
        optimizer.zero_grad()
        (summed_loss(batch.inputs) / batch.n_loss_tokens).backward()
        optimizer.step()
    after = val_loss()
    assert after < before * 2 / 3, (before, after)
