"""A shared forward pass that fails with an error other than out-of-memory (workers.cotrain): nobody can
tell whose tokens caused it, so each member retries its step in a pass of its own; only the member
whose own pass fails gets the error, the others finish as alone (fp32, CPU)."""

from __future__ import annotations

import workers.cotrain as cotrain
from tests.workers.test_cotrain_exactness import assert_same_adapter
from tests.workers.test_cotrain_memory import _spec
from workers.cotrain import GroupMember, train_group
from workers.loop import TrainingResult, train
from workers.reporting import ListReporter


class BadMember(Exception):
    """What the faulty member's forward pass raises (a stand-in for, say, a kernel refusing its input)."""


def test_a_failed_shared_pass_fails_only_the_member_whose_own_pass_fails(tiny_model_dir, tmp_path, monkeypatch):
    specs = {name: _spec(tiny_model_dir, tmp_path / "data", name, seed=seed, max_seq_len=64, batch_size=2,
                         dropout=0.0)
             for name, seed in (("good", 1), ("bad", 2))}
    alone = train(specs["good"], output_dir=tmp_path / "alone", reporter=ListReporter())

    route = cotrain.route

    def route_failing_for_the_bad_member(run, *args):
        if run.adapter_name == cotrain._adapter_name(1):  # "bad" is the group's second member
            raise BadMember("this member's tokens break the forward pass")
        return route(run, *args)

    monkeypatch.setattr(cotrain, "route", route_failing_for_the_bad_member)
    reporters = {name: ListReporter() for name in specs}
    outcomes = train_group([GroupMember(name, specs[name], tmp_path / "group" / name, reporters[name])
                            for name in ("good", "bad")])

    assert isinstance(outcomes["bad"], BadMember)
    good = outcomes["good"]
    assert isinstance(good, TrainingResult) and good.status == "succeeded", good
    assert any("retrying the step in a pass of its own" in m for _, m in reporters["good"].logs)
    assert (good.step, good.tokens_trained) == (alone.step, alone.tokens_trained)
    assert_same_adapter(good.adapter_dir, alone.adapter_dir)

