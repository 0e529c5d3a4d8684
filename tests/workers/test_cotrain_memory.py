"""A co-trained group shares the device's memory among its members' micro-batches, and one that runs out of
memory backs off as its members would alone (fp32, CPU).

`Runtime.max_micro_batch_tokens` stands in for the device's memory: a forward pass over more tokens
raises torch.OutOfMemoryError. In a group the pass holds every member's micro-batch, so the cap
applies to their sum; alone, to the job's own micro-batch.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lora_core import delete_adapter
from tests.workers.test_cotrain_exactness import assert_same_adapter
from workers.co_training_plan import group_device_bytes
from workers.cotrain import GroupMember, pass_token_budget, train_group
from workers.loop import Runtime, TrainingResult, add_job_adapter, load_base, train
from workers.memory_plan import DecoderShape, plan_micro_batch, query_size
from workers.reporting import ListReporter
from workers.spec import TrainingSpec
from workers.synthetic import write_synthetic_dataset

CAP = 176  # tokens a pass may hold: 2 rows of 64 beside 1 row of 48, not 4 rows of 64


def _spec(model_dir: Path, data_dir: Path, name: str, *, seed: int, max_seq_len: int, batch_size: int,
          accumulation: int = 1, steps: int = 3, task: str = "reverse", dropout: float = 0.1) -> TrainingSpec:
    data_dir.mkdir(parents=True, exist_ok=True)
    data = write_synthetic_dataset(data_dir / f"{name}.jsonl", 48, seed=seed, task=task)
    return TrainingSpec(
        base_model=model_dir, training_file=data,
        max_seq_len=max_seq_len, n_checkpoints=0, seed=seed,
        lora={"r": 4, "alpha": 8, "dropout": dropout, "target_modules": ["q_proj", "v_proj"]},
        hyperparameters={"n_epochs": 1, "batch_size": batch_size, "gradient_accumulation_steps": accumulation,
                         "learning_rate": 2e-3, "max_steps": steps},
    )


def _assert_same_metrics(got: ListReporter, want: ListReporter) -> None:
    assert [s for s, _ in got.metric_rows] == [s for s, _ in want.metric_rows]
    for (step, row), (_, expected) in zip(got.metric_rows, want.metric_rows, strict=True):
        assert row.keys() == expected.keys()
        for key, value in row.items():
            if key != "tokens_per_s":
                assert math.isclose(value, expected[key], rel_tol=1e-4, abs_tol=1e-5), (step, key, value, expected[key])


def _alone_then_group(specs: dict[str, TrainingSpec], tmp_path: Path, group_runtime: Runtime):
    """Each job trained alone (the default runtime), then all of them co-trained under `group_runtime`:
    ({name: (lone result, its events)}, {name: group events}, {name: group outcome})."""
    alone = {}
    for name, spec in specs.items():
        reporter = ListReporter()
        alone[name] = (train(spec, output_dir=tmp_path / "alone" / name, reporter=reporter), reporter)
    reporters = {name: ListReporter() for name in specs}
    outcomes = train_group([GroupMember(name, spec, tmp_path / "group" / name, reporters[name])
                            for name, spec in specs.items()], runtime=group_runtime)
    return alone, reporters, outcomes


def _warnings(reporter: ListReporter) -> list[str]:
    return [message for level, message in reporter.logs if level == "warning"]


def _infos(reporter: ListReporter) -> list[str]:
    return [message for level, message in reporter.logs if level != "warning" and "co-trained with" not in message]


def test_a_group_out_of_memory_splits_its_largest_member_as_alone_and_fails_only_one_that_never_fits(
        tiny_model_dir, tmp_path):
    """big (4 rows of 64) halves its micro-batch as it does alone under the same cap; small (1 row of 48)
    is untouched; huge (rows of ~192) fits no pass even with one sequence: it fails with the error it gets
    alone, and the other two finish with the adapters, metrics and split they get alone."""
    specs = {
        "big": _spec(tiny_model_dir, tmp_path / "data", "big", seed=1, max_seq_len=64, batch_size=4),
        "small": _spec(tiny_model_dir, tmp_path / "data", "small", seed=2, max_seq_len=48, batch_size=1,
                       accumulation=2, task="sort"),
        "huge": _spec(tiny_model_dir, tmp_path / "data", "huge", seed=3, max_seq_len=192, batch_size=2),
    }
    runtime = Runtime(max_micro_batch_tokens=CAP)
    alone: dict[str, tuple[TrainingResult, ListReporter]] = {}
    for name in ("big", "small"):
        reporter = ListReporter()
        alone[name] = (train(specs[name], output_dir=tmp_path / "alone" / name, reporter=reporter, runtime=runtime),
                       reporter)
    with pytest.raises(torch.OutOfMemoryError) as alone_error:
        train(specs["huge"], output_dir=tmp_path / "alone" / "huge", reporter=ListReporter(), runtime=runtime)

    reporters = {name: ListReporter() for name in specs}
    outcomes = train_group([GroupMember(name, spec, tmp_path / "group" / name, reporters[name])
                            for name, spec in specs.items()], runtime=runtime)

    assert isinstance(outcomes["huge"], torch.OutOfMemoryError), outcomes["huge"]
    assert str(outcomes["huge"]) == str(alone_error.value)  # "... even one sequence ...: lower max_seq_len, ..."
    assert any("a forward pass of its own" in m for m in _warnings(reporters["huge"]))
    for name in ("big", "small"):
        got, (want, want_events) = outcomes[name], alone[name]
        assert isinstance(got, TrainingResult) and got.status == "succeeded", got
        assert (got.step, got.tokens_trained) == (want.step, want.tokens_trained)
        assert got.hyperparameters == want.hyperparameters
        assert_same_adapter(got.adapter_dir, want.adapter_dir)
        _assert_same_metrics(reporters[name], want_events)
        assert _infos(reporters[name]) == _infos(want_events)
    assert (outcomes["big"].hyperparameters["batch_size"],
            outcomes["big"].hyperparameters["gradient_accumulation_steps"]) == (2, 2)
    [warning] = _warnings(reporters["big"])  # the same back-off as alone; the pass it was in was larger
    [alone_warning] = _warnings(alone["big"][1])
    assert warning.split("): ")[1] == alone_warning.split("): ")[1] == (
        "retrying it with micro-batches of 2 sequences and 2 accumulation steps")
    assert "out of memory at step 1" in warning and f"max_micro_batch_tokens={CAP}" in warning
    assert _warnings(reporters["small"]) == []


def test_members_at_one_sequence_that_do_not_fit_together_train_in_passes_of_their_own(tiny_model_dir, tmp_path):
    """Two jobs of one row of 64 tokens each, a cap of 100: neither needs a back-off alone, together they
    do not fit; the larger takes a pass of its own and both end as alone."""
    specs = {name: _spec(tiny_model_dir, tmp_path / "data", name, seed=seed, max_seq_len=64, batch_size=1,
                         accumulation=2)
             for name, seed in (("a", 4), ("b", 5))}
    alone, reporters, outcomes = _alone_then_group(specs, tmp_path, Runtime(max_micro_batch_tokens=100))

    for name, (want, want_events) in alone.items():
        got = outcomes[name]
        assert isinstance(got, TrainingResult) and got.status == "succeeded", got
        assert got.hyperparameters == want.hyperparameters  # nobody's micro-batch was split
        assert_same_adapter(got.adapter_dir, want.adapter_dir)
        _assert_same_metrics(reporters[name], want_events)
        assert _infos(reporters[name]) == _infos(want_events)
    moved = [w for r in reporters.values() for w in _warnings(r)]
    assert len(moved) == 1 and "a forward pass of its own" in moved[0], moved


def test_a_step_cut_short_by_out_of_memory_is_retried_from_its_first_micro_batch(tiny_model_dir, tmp_path):
    """steady (one row, 2 micro-batches a step, unpacked rows of 49 then 61 tokens) is half-way through its
    step 1 when the pass with wide's step 2 (2 rows, 122 tokens) runs out of memory (183 > 180 tokens; the
    first pass held 177). steady drops its first micro-batch's gradient and retries the step, so it ends as
    alone; wide, which fits alone, halves its micro-batch in the group and trains the same rows per step."""
    specs = {
        # no dropout: its masks follow the micro-batches' positions, which a split renumbers (alone too)
        "wide": _spec(tiny_model_dir, tmp_path / "data", "wide", seed=6, max_seq_len=64, batch_size=2, dropout=0.0),
        "steady": _spec(tiny_model_dir, tmp_path / "data", "steady", seed=17, max_seq_len=64, batch_size=1,
                        accumulation=2, task="sort").model_copy(update={"packing": False}),
    }
    runtime = Runtime(max_micro_batch_tokens=180)
    alone = {}
    for name, spec in specs.items():
        reporter = ListReporter()
        alone[name] = (train(spec, output_dir=tmp_path / "alone" / name, reporter=reporter, runtime=runtime),
                       reporter)
    reporters = {name: ListReporter() for name in specs}
    outcomes = train_group([GroupMember(name, spec, tmp_path / "group" / name, reporters[name])
                            for name, spec in specs.items()], runtime=runtime)

    [warning] = _warnings(reporters["wide"])
    assert warning.startswith("out of memory at step 2 (micro-batch of 183 tokens")
    assert (outcomes["wide"].hyperparameters["batch_size"],
            outcomes["wide"].hyperparameters["gradient_accumulation_steps"]) == (1, 2)
    assert_same_adapter(outcomes["wide"].adapter_dir, alone["wide"][0].adapter_dir)  # same rows, rounding apart
    _assert_same_metrics(reporters["wide"], alone["wide"][1])

    got, (want, want_events) = outcomes["steady"], alone["steady"]
    assert isinstance(got, TrainingResult) and got.status == "succeeded", got
    assert got.hyperparameters == want.hyperparameters and got.tokens_trained == want.tokens_trained
    assert_same_adapter(got.adapter_dir, want.adapter_dir)
    _assert_same_metrics(reporters["steady"], want_events)
    assert _infos(reporters["steady"]) == _infos(want_events) and _warnings(reporters["steady"]) == []


def _auto_spec(model_dir: Path, data_dir: Path, name: str, *, seed: int, steps: int, dropout: float = 0.0,
               batch_size: int | str = "auto", accumulation: int = 1) -> TrainingSpec:
    """2100 unpacked examples: an "auto" batch of 4 sequences (0.2 % of them) of up to 64 tokens."""
    data_dir.mkdir(parents=True, exist_ok=True)
    data = write_synthetic_dataset(data_dir / f"{name}.jsonl", 2100, seed=seed)
    return TrainingSpec(
        base_model=model_dir, training_file=data, max_seq_len=64, packing=False, n_checkpoints=0, seed=seed,
        lora={"r": 4, "alpha": 8, "dropout": dropout, "target_modules": ["q_proj", "v_proj"]},
        hyperparameters={"n_epochs": 1, "batch_size": batch_size, "gradient_accumulation_steps": accumulation,
                         "learning_rate": 2e-3, "max_steps": steps},
    )


def _split(result: TrainingResult) -> tuple[int, int]:
    return result.hyperparameters["batch_size"], result.hyperparameters["gradient_accumulation_steps"]


def test_auto_micro_batches_share_the_pass_instead_of_each_planning_the_whole_device(tiny_model_dir, tmp_path):
    """Three jobs of an "auto" batch of 4 sequences (≤ 256 tokens: each fits the cap of 384 alone): the
    group plans one pass of 384 tokens for the three, 2 sequences each with 2 accumulation steps, so no
    pass runs out of memory (each member planning as if alone put ~3 × 256 tokens in a pass and backed
    off). The steps' rows are those of alone: without dropout, the same adapters and metrics."""
    specs = {name: _auto_spec(tiny_model_dir, tmp_path / "data", name, seed=seed, steps=3)
             for name, seed in (("a", 21), ("b", 22), ("c", 23))}
    alone, reporters, outcomes = _alone_then_group(specs, tmp_path, Runtime(max_micro_batch_tokens=384))
    assert all(_split(result) == (4, 1) for result, _ in alone.values())

    for name, (want, want_events) in alone.items():
        got = outcomes[name]
        assert isinstance(got, TrainingResult) and got.status == "succeeded", got
        assert _warnings(reporters[name]) == [], _warnings(reporters[name])  # no out-of-memory back-off
        assert _split(got) == (2, 2)
        [plan] = [m for m in _infos(reporters[name]) if m.startswith("co-training memory plan")]
        assert plan == ("co-training memory plan (384 tokens a forward pass for 3 jobs): from step 1, "
                        "micro-batches of 2 sequences and 2 accumulation steps")
        assert got.tokens_trained == want.tokens_trained
        assert_same_adapter(got.adapter_dir, want.adapter_dir)
        _assert_same_metrics(reporters[name], want_events)


def test_when_a_member_leaves_the_others_grow_back_only_where_that_keeps_their_results(tiny_model_dir, tmp_path):
    """A cap of 384 tokens for three "auto" jobs of 4 sequences: 2 each. After `brief` ends (1 step), the
    pass has room again: `grows` (no dropout) takes its whole batch of 4 from its next step on and still
    trains the adapter it gets alone; `keeps` (LoRA dropout, whose masks follow the micro-batches'
    positions) keeps 2 × 2, so its adapter is the one of a lone run with that split."""
    specs = {
        "grows": _auto_spec(tiny_model_dir, tmp_path / "data", "grows", seed=31, steps=4),
        "keeps": _auto_spec(tiny_model_dir, tmp_path / "data", "keeps", seed=32, steps=4, dropout=0.1),
        "brief": _auto_spec(tiny_model_dir, tmp_path / "data", "brief", seed=33, steps=1),
    }
    want_grows = train(specs["grows"], output_dir=tmp_path / "alone" / "grows", reporter=ListReporter())
    keeps_alone = _auto_spec(tiny_model_dir, tmp_path / "data", "keeps", seed=32, steps=4, dropout=0.1,
                             batch_size=2, accumulation=2)
    want_keeps = train(keeps_alone, output_dir=tmp_path / "alone" / "keeps", reporter=ListReporter())
    reporters = {name: ListReporter() for name in specs}
    outcomes = train_group([GroupMember(name, spec, tmp_path / "group" / name, reporters[name])
                            for name, spec in specs.items()], runtime=Runtime(max_micro_batch_tokens=384))

    assert all(isinstance(o, TrainingResult) and o.status == "succeeded" for o in outcomes.values()), outcomes
    assert all(_warnings(r) == [] for r in reporters.values())
    plans = [m for m in _infos(reporters["grows"]) if m.startswith("co-training memory plan")]
    assert plans == [
        "co-training memory plan (384 tokens a forward pass for 3 jobs): from step 1, micro-batches of 2 "
        "sequences and 2 accumulation steps",
        # brief leaves when it finds no next step, after grows has taken its step 2
        "co-training memory plan (384 tokens a forward pass for 2 jobs): from step 3, micro-batches of 4 "
        "sequences and 1 accumulation steps",
    ]
    assert _split(outcomes["grows"]) == (4, 1) and _split(outcomes["keeps"]) == (2, 2)
    assert_same_adapter(outcomes["grows"].adapter_dir, want_grows.adapter_dir)
    assert_same_adapter(outcomes["keeps"].adapter_dir, want_keeps.adapter_dir)


def test_the_group_device_is_the_setting_else_the_smallest_gpu_seen_else_unchecked_on_cpu():
    """`co_training_memory_gib` wins; unset on real GPUs the smallest GPU this node sees sizes the group
    (an 80 and a 40 GiB GPU: 40), without any configuration; on CPU logical accelerators, or with no GPU
    in sight, None: memory is not checked (the group size limit bounds the group)."""
    gib = 2**30
    gpus = lambda: [80 * gib, 40 * gib]  # noqa: E731  what torch reports on the dispatcher's node
    assert group_device_bytes(24.0, True, gpus) == 24 * gib
    assert group_device_bytes(24.0, False, gpus) == 24 * gib
    assert group_device_bytes(None, True, gpus) == 40 * gib
    assert group_device_bytes(None, True, list) is None
    assert group_device_bytes(None, False, gpus) is None


def test_the_pass_budget_on_a_device_counts_the_base_once_and_every_adapter_still_in_the_model(
        tiny_model_dir, tmp_path):
    """On a device of a given size (passed in: no GPU here), the group's pass may hold the tokens of the
    memory plan with the base once and both members' adapter states; when a member's adapter leaves the
    model, the budget grows by the tokens its state held. The CPU stand-in's cap bounds it; neither
    given: None (nothing planned, as alone on a CPU)."""
    specs = [_spec(tiny_model_dir, tmp_path / "data", name, seed=seed, max_seq_len=64, batch_size=1)
             for name, seed in (("a", 1), ("b", 2))]
    model = load_base(specs[0], torch.device("cpu"), torch.float32)
    for i, spec in enumerate(specs):
        add_job_adapter(model, spec, f"job{i}")
    trainable = [p.numel() for p in model.parameters() if p.requires_grad]
    base = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()) if not t.requires_grad)
    device = 2 * 2**30
    budget = dict(device_bytes=device, compute_dtype=torch.float32, gradient_checkpointing=True, quantization=None)
    want = plan_micro_batch(device_bytes=device, weights_bytes=base, n_adapter_params=sum(trainable),
                            shape=DecoderShape.from_config(model.config), activation_bytes=4,
                            q_size=query_size(model.config))
    both = pass_token_budget(model, **budget)
    assert both == want.max_tokens > 0
    assert pass_token_budget(model, **budget, cap=100) == 100
    assert pass_token_budget(model, **{**budget, "device_bytes": None}) is None
    assert pass_token_budget(model, **{**budget, "device_bytes": None}, cap=100) == 100

    delete_adapter(model, "job1")
    left = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < left < sum(trainable)
    assert pass_token_budget(model, **budget) == plan_micro_batch(
        device_bytes=device, weights_bytes=base, n_adapter_params=left, shape=DecoderShape.from_config(model.config),
        activation_bytes=4, q_size=query_size(model.config)).max_tokens > both
