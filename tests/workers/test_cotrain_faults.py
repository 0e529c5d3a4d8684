"""Co-training where something other than the adapters is in play (fp32, CPU): a base that draws its own
dropout, a member's reporter failing while the group backs off or retries, and a shared pass that failed
once. Each member still ends as it ends alone, and only the member at fault fails."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from torch import nn

import workers.cotrain as cotrain
from tests.workers.test_cotrain_exactness import _tensors, assert_same_adapter, assert_same_events, assert_same_result
from tests.workers.test_cotrain_memory import _spec
from workers.cotrain import GroupMember, train_group
from workers.loop import Runtime, TrainingResult, train
from workers.reporting import ListReporter
from workers.spec import TrainingSpec


@pytest.fixture(scope="module")
def dropout_base(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama with the base's own attention dropout on (GPT-2 and OPT ship 0.1 in their configs)."""
    model = tmp_path_factory.mktemp("dropout-base") / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["attention_dropout"] = 0.1
    (model / "config.json").write_text(json.dumps(config))
    return model


def _dropout_specs(model: Path, data: Path) -> dict[str, TrainingSpec]:
    a = _spec(model, data, "a", seed=1, max_seq_len=64, batch_size=2, steps=4, dropout=0.1)
    b = _spec(model, data, "b", seed=2, max_seq_len=48, batch_size=1, accumulation=2, steps=4, task="sort",
              dropout=0.0)
    return {"a": a.model_copy(update={"n_checkpoints": 2}), "b": b.model_copy(update={"n_checkpoints": 2})}


def test_a_base_with_its_own_dropout_co_trains_each_member_as_alone_and_resumes_both_ways(
        dropout_base, tiny_model_dir, tmp_path):
    """The base's dropout draws from the global RNG: each member trains in passes of its own with its own
    stream swapped in, so it draws what it draws alone, and its checkpoints carry that stream. b pauses
    at step 2 in the group, a at step 2 alone; both resume in a second group and end where their
    straight lone runs end."""
    specs = _dropout_specs(dropout_base, tmp_path / "data")
    alone = {}
    for name, spec in specs.items():
        reporter = ListReporter()
        alone[name] = (train(spec, output_dir=tmp_path / "alone" / name, reporter=reporter), reporter)
    # Alone, the base's dropout is on as it always was: without it b trains to another adapter.
    no_dropout = train(specs["b"].model_copy(update={"base_model": tiny_model_dir}),
                       output_dir=tmp_path / "no-dropout", reporter=None)
    with_, without = (_tensors(r.adapter_dir) for r in (alone["b"][0], no_dropout))
    assert max(float((with_[k] - without[k]).abs().max()) for k in with_) > 1e-3

    reporters = {"a": ListReporter(), "b": ListReporter(control_at={2: "pause"})}
    first = train_group([GroupMember(name, spec, tmp_path / "g1" / name, reporters[name])
                         for name, spec in specs.items()])
    want, want_events = alone["a"]
    assert isinstance(first["a"], TrainingResult) and first["a"].status == "succeeded", first["a"]
    assert_same_adapter(first["a"].adapter_dir, want.adapter_dir)
    assert_same_result(first["a"], want)
    assert_same_events(reporters["a"], want_events)
    [said] = [m for _, m in reporters["a"].logs if "co-trained with" in m]
    assert "forward passes of its own: the base draws its own dropout (attention_dropout=0.1)" in said
    paused_in_group = first["b"]
    assert (paused_in_group.status, paused_in_group.step) == ("paused", 2)

    paused_alone = train(specs["a"], output_dir=tmp_path / "paused-alone",
                         reporter=ListReporter(control_at={2: "pause"}))
    assert paused_alone.status == "paused"
    second = train_group([
        GroupMember("a", specs["a"], tmp_path / "g2" / "a", ListReporter(), resume_from=paused_alone.checkpoint),
        GroupMember("b", specs["b"], tmp_path / "g2" / "b", ListReporter(), resume_from=paused_in_group.checkpoint),
    ])
    for name, (want, _) in alone.items():
        got = second[name]
        assert isinstance(got, TrainingResult) and got.step == want.step, got
        assert_same_adapter(got.adapter_dir, want.adapter_dir)


def test_what_in_a_base_draws_random_numbers_is_named_and_lora_dropout_is_not():
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_core import add_adapter
    from lora_core.config import LoraConfig
    from workers.cotrain import base_draws

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    add_adapter(model, LoraConfig(r=2, alpha=4, dropout=0.1, target_modules=["q_proj"]), "job0")
    assert base_draws(model) == []
    model.config.attention_dropout = 0.1
    model.model.layers[0].mlp.dropout = nn.Dropout(0.2)
    assert base_draws(model) == ["attention_dropout=0.1", "1 nn.Dropout modules such as model.layers.0.mlp.dropout"]


class _WarningsFail(ListReporter):
    """A reporter whose delivery of warnings fails (a background delivery that broke, Redis refusing writes)."""

    def log(self, message: str, level: str = "info") -> None:
        if level == "warning":
            raise ConnectionError("the events stream is gone")
        super().log(message, level)


@pytest.mark.parametrize("case", ["back-off", "own lane"])
def test_a_reporter_failing_while_its_member_gives_way_fails_that_member_only(tiny_model_dir, tmp_path, case):
    """The shared pass runs out of memory; the member giving way (a back-off, or a move to a pass of its
    own) says so through its reporter, which raises: that member fails with the reporter's error, the
    other one ends as alone."""
    if case == "back-off":  # a: 4 rows of 64 beside b's row of 48 > 160 tokens: a halves its micro-batch
        a = _spec(tiny_model_dir, tmp_path / "data", "a", seed=1, max_seq_len=64, batch_size=4)
        b = _spec(tiny_model_dir, tmp_path / "data", "b", seed=2, max_seq_len=48, batch_size=1, task="sort")
        cap = 160
    else:  # one row of 64 each, a cap of 100: the larger moves to a pass of its own
        a, b = (_spec(tiny_model_dir, tmp_path / "data", name, seed=seed, max_seq_len=64, batch_size=1,
                      accumulation=2) for name, seed in (("a", 4), ("b", 5)))
        cap = 100
    alone = {name: train(spec, output_dir=tmp_path / "alone" / name, reporter=None,
                         runtime=Runtime(max_micro_batch_tokens=cap))
             for name, spec in (("a", a), ("b", b))}
    outcomes = train_group([GroupMember("a", a, tmp_path / "g" / "a", _WarningsFail()),
                            GroupMember("b", b, tmp_path / "g" / "b", _WarningsFail())],
                           runtime=Runtime(max_micro_batch_tokens=cap))
    [failed] = [name for name, outcome in outcomes.items() if isinstance(outcome, BaseException)]
    assert isinstance(outcomes[failed], ConnectionError), outcomes[failed]
    other = "b" if failed == "a" else "a"
    result = outcomes[other]
    assert isinstance(result, TrainingResult) and result.status == "succeeded", result
    assert_same_adapter(result.adapter_dir, alone[other].adapter_dir)


class BadMember(Exception):
    """What a faulty forward pass raises (a stand-in for, say, a kernel refusing an input)."""


def _record_passes(monkeypatch, fails: callable) -> list[list[str]]:
    """Every forward pass's members' adapter names, in order; a pass for which `fails(names)` raises BadMember."""
    passes: list[list[str]] = []
    forward_backward = cotrain._forward_backward

    def recorded(model, loss_module, autocast, in_pass):
        names = [m.run.adapter_name for m in in_pass]
        passes.append(names)
        if fails(names):
            raise BadMember(f"the pass over {names} breaks")
        return forward_backward(model, loss_module, autocast, in_pass)

    monkeypatch.setattr(cotrain, "_forward_backward", recorded)
    return passes


def _three(model: Path, data: Path) -> dict[str, TrainingSpec]:
    return {name: _spec(model, data, name, seed=seed, max_seq_len=48, batch_size=2, steps=3, dropout=0.0)
            for name, seed in (("good", 1), ("other", 3), ("bad", 2))}


def test_a_reporter_failing_while_a_failed_shared_pass_is_retried_fails_that_member_only(
        tiny_model_dir, tmp_path, monkeypatch):
    specs = _three(tiny_model_dir, tmp_path / "data")
    alone = train(specs["good"], output_dir=tmp_path / "alone", reporter=None)
    _record_passes(monkeypatch, lambda names: "job2" in names)  # "bad" is the third member
    reporters = {"good": ListReporter(), "other": _WarningsFail(), "bad": ListReporter()}
    outcomes = train_group([GroupMember(name, spec, tmp_path / "g" / name, reporters[name])
                            for name, spec in specs.items()])
    assert isinstance(outcomes["other"], ConnectionError), outcomes["other"]
    assert isinstance(outcomes["bad"], BadMember), outcomes["bad"]
    assert outcomes["good"].status == "succeeded", outcomes["good"]
    assert_same_adapter(outcomes["good"].adapter_dir, alone.adapter_dir)


def test_members_whose_retried_step_succeeds_rejoin_the_shared_pass(tiny_model_dir, tmp_path, monkeypatch):
    """The first shared pass fails because of bad's tokens: each member retries its step in a pass of its
    own, bad fails, and good and other share their passes again from their next step, as alone."""
    specs = _three(tiny_model_dir, tmp_path / "data")
    alone = {name: train(specs[name], output_dir=tmp_path / "alone" / name, reporter=None)
             for name in ("good", "other")}
    passes = _record_passes(monkeypatch, lambda names: "job2" in names)
    outcomes = train_group([GroupMember(name, spec, tmp_path / "g" / name, ListReporter())
                            for name, spec in specs.items()])
    assert isinstance(outcomes["bad"], BadMember)
    assert passes == [["job0", "job1", "job2"], ["job0"], ["job1"], ["job2"], ["job0", "job1"], ["job0", "job1"]]
    for name, want in alone.items():
        assert outcomes[name].status == "succeeded", outcomes[name]
        assert_same_adapter(outcomes[name].adapter_dir, want.adapter_dir)


def test_members_whose_shared_pass_fails_again_after_rejoining_keep_passes_of_their_own(
        tiny_model_dir, tmp_path, monkeypatch):
    """A pass fails whenever two members share it (their combination, not one member's tokens): they
    rejoin once, fail once more, and then train apart to the end, as alone; no pass fails a third time."""
    specs = _three(tiny_model_dir, tmp_path / "data")
    del specs["bad"]
    alone = train(specs["good"], output_dir=tmp_path / "alone", reporter=None)
    passes = _record_passes(monkeypatch, lambda names: len(names) > 1)
    reporters = {name: ListReporter() for name in specs}
    outcomes = train_group([GroupMember(name, spec, tmp_path / "g" / name, reporters[name])
                            for name, spec in specs.items()])
    assert passes == [["job0", "job1"], ["job0"], ["job1"], ["job0", "job1"], ["job0"], ["job1"], ["job0"], ["job1"]]
    assert all(outcome.status == "succeeded" for outcome in outcomes.values()), outcomes
    assert_same_adapter(outcomes["good"].adapter_dir, alone.adapter_dir)
    warnings = [m for level, m in reporters["good"].logs if level == "warning"]
    assert len(warnings) == 2 and warnings[1].endswith("and in passes of its own from then on"), warnings
