"""Co-training where something other than the adapters is in play (fp32, CPU): a member's reporter failing
while the group backs off or retries, and a shared pass that failed once. Each member still ends as it
ends alone, and only the member at fault fails."""

from __future__ import annotations

from pathlib import Path

import pytest

import workers.cotrain as cotrain
from tests.workers.test_cotrain_exactness import assert_same_adapter
from tests.workers.test_cotrain_memory import _spec
from workers.cotrain import GroupMember, train_group
from workers.loop import Runtime, TrainingResult, train
from workers.reporting import ListReporter
from workers.spec import TrainingSpec


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
