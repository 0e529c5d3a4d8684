"""The co-training group's micro-batch plan: one pass's token budget shared among the members (pure)."""

from __future__ import annotations

from workers.memory_plan import DecoderShape, MemberSplit, plan_group_micro_batches, plan_micro_batch

GiB = 2**30
LLAMA_1B = DecoderShape(n_layers=16, hidden_size=2048, intermediate_size=8192, kv_size=8 * 64)  # Llama 3.2 1B


def _auto(step: int, *, seq_len: int = 2048, least: int = 1, most: int | None = None) -> MemberSplit:
    return MemberSplit(seq_len=seq_len, step_sequences=step, least=least, most=step if most is None else most)


def _tokens(split: list[int], members: list[MemberSplit]) -> int:
    return sum(n * m.seq_len for n, m in zip(split, members, strict=True))


def test_four_members_that_each_fit_the_device_alone_get_equal_shares_that_fit_it_together():
    """Each of four 16-sequence jobs fits the whole budget alone (16 × 2048 tokens); together they get
    4 sequences each, not 16: the pass holds the budget, not four times it."""
    members = [_auto(16) for _ in range(4)]
    budget = 16 * 2048
    split = plan_group_micro_batches(budget, members)
    assert split == [4, 4, 4, 4]
    assert _tokens(split, members) <= budget


def test_a_member_that_needs_less_than_its_share_leaves_the_rest_to_the_others():
    """Max-min fair: the 2-sequence job takes 2; the two 16-sequence jobs share the other 14 (in divisors
    of 16: 7 would not keep their steps' rows): both get 4, then the room left takes one of them to 8
    (the other's 8 no longer fits). Nobody grows while a smaller member still could."""
    members = [_auto(2), _auto(16), _auto(16)]
    split = plan_group_micro_batches(16 * 2048, members)
    assert split == [2, 8, 4]
    assert plan_group_micro_batches(13 * 2048, members) == [2, 4, 4]
    assert plan_group_micro_batches(18 * 2048, members) == [2, 8, 8]


def test_shares_are_counted_in_tokens_and_respect_each_members_bounds():
    """A member of 512-token sequences gets 4 × as many sequences as one of 2048 for the same share; an
    explicit batch size (least = most) is taken as given and the others share what is left; a member
    already at its least keeps it even when the budget is short (the out-of-memory back-off decides)."""
    short, long = _auto(16, seq_len=512), _auto(16, seq_len=2048)
    assert plan_group_micro_batches(4 * 2048, [short, long]) == [8, 2]  # 4096 tokens each
    assert plan_group_micro_batches(8 * 2048, [short, long]) == [16, 4]
    fixed = MemberSplit(seq_len=2048, step_sequences=8, least=8, most=8)
    assert plan_group_micro_batches(12 * 2048, [fixed, _auto(16), _auto(16)]) == [8, 2, 2]
    assert plan_group_micro_batches(1024, [fixed, _auto(16)]) == [8, 1]
    # most: a member backed off (or planned alone) to 2 never grows past it
    assert plan_group_micro_batches(64 * 2048, [_auto(16, most=2), _auto(16)]) == [2, 16]


def test_the_split_grows_back_when_a_member_leaves():
    """Re-planned for three of the four members (least = their current split), each gets more, and a
    larger budget (the leaving adapter's state freed) never gives anyone less."""
    four = plan_group_micro_batches(16 * 2048, [_auto(16) for _ in range(4)])
    three = plan_group_micro_batches(16 * 2048, [_auto(16, least=n) for n in four[:3]])
    assert four == [4, 4, 4, 4] and three == [8, 4, 4]
    assert _tokens(three, [_auto(16)] * 3) <= 16 * 2048


def test_the_device_budget_counts_the_base_once_and_every_members_adapter_state():
    """What the group shares on a device: plan_micro_batch with the one base and the four members'
    adapters (16 bytes a parameter) in its fixed part; four members' lone plans would sum to ~4 × that."""
    args = dict(device_bytes=80 * GiB, weights_bytes=int(2.5 * GiB), shape=LLAMA_1B)
    adapters = [11_000_000, 22_000_000, 22_000_000, 44_000_000]
    group = plan_micro_batch(n_adapter_params=sum(adapters), **args)
    alone = [plan_micro_batch(n_adapter_params=n, **args) for n in adapters]
    assert group.fixed_bytes == int(2.5 * GiB) + 16 * sum(adapters) + 3 * 64 * 2**20 + GiB
    assert sum(p.max_tokens for p in alone) > 3.9 * group.max_tokens
    split = plan_group_micro_batches(group.max_tokens, [_auto(16) for _ in adapters])
    assert group.fixed_bytes + _tokens(split, [_auto(16)] * 4) * group.bytes_per_token <= 0.9 * 80 * GiB
