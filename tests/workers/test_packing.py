"""Packing, padding, sharding and resume: packed blocks must give exactly the loss of separate examples."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.packing import DataPosition, count_batches, make_batches, plan_epoch
from workers.tokenization import IGNORE_INDEX, TokenizedExample, tokenize_example

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def examples(tokenizer) -> list[TokenizedExample]:
    rng = random.Random(0)
    out = []
    for k in range(11):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
        record = {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": text.upper()}]}
        out.append(tokenize_example(record, tokenizer, max_seq_len=128, train_on_inputs=k % 3 == 0))
    return out


def _summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies in float64, with the causal shift the model applies to labels."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).double(),
        labels[:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def _example_spans(batch):
    """(row, start, length) of each example in a packed batch, from the restarting position ids."""
    spans = []
    for r, pos in enumerate(batch.inputs["position_ids"].tolist()):
        starts = [t for t, p in enumerate(pos) if p == 0] + [len(pos)]
        spans += [(r, a, b - a) for a, b in zip(starts, starts[1:], strict=False)]
    return spans


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_logits_equal_examples_processed_one_by_one(tiny_model_dir, tokenizer, examples, attn):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([e.input_ids])).logits[0] for e in examples]
        reference = sum(_summed_loss(lg[None], torch.tensor([e.labels])) for lg, e in zip(alone, examples, strict=True))
        by_ids = {tuple(e.input_ids): lg for e, lg in zip(examples, alone, strict=True)}
        for mode in (
            {"packing": True, "block_mask": "4d"},
            {"packing": True, "block_mask": "position_ids"},
            {"packing": False},
        ):
            total, n_loss_tokens, n_seen = torch.zeros((), dtype=torch.float64), 0, 0
            for batch in make_batches(
                examples, block_len=256, batch_size=2, pad_id=tokenizer.pad_token_id, seed=3, **mode
            ):
                inputs = dict(batch.inputs)
                labels = inputs.pop("labels")
                logits = model(**inputs, use_cache=False).logits
                total += _summed_loss(logits, labels)
                n_loss_tokens += batch.n_loss_tokens
                spans = (
                    _example_spans(batch)
                    if mode["packing"]
                    else [(r, 0, int(m.sum())) for r, m in enumerate(inputs["attention_mask"])]
                )
                for r, start, length in spans:
                    ids = tuple(inputs["input_ids"][r, start : start + length].tolist())
                    if ids in by_ids:  # not the padding segment
                        torch.testing.assert_close(logits[r, start : start + length], by_ids[ids], rtol=1e-5, atol=1e-5)
                        n_seen += 1
            assert n_seen == len(examples), mode
            assert n_loss_tokens == sum(e.n_loss_tokens for e in examples)
            assert abs(total.item() - reference.item()) <= 1e-5 * abs(reference.item()), mode


def test_packing_fills_blocks_with_every_example_exactly_once(examples):
    lengths = [len(e) for e in examples]
    plan = plan_epoch(lengths, block_len=128, batch_size=2, seed=0)
    rows = [row for step in plan for row in step]
    assert sorted(i for row in rows for i in row) == list(range(len(examples)))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert len(rows) < len(examples)  # it actually packs
    assert all(len(step) == 2 for step in plan[:-1])


def test_packed_batches_restart_positions_and_never_attend_across_examples(tokenizer, examples):
    batch = next(make_batches(examples, block_len=128, batch_size=2, pad_id=tokenizer.pad_token_id, seed=0))
    mask = batch.inputs["attention_mask"]
    assert mask.shape[:2] == (2, 1) and mask.dtype == torch.float32
    for r, start, length in _example_spans(batch):
        allowed = mask[r, 0] == 0
        block = torch.zeros_like(allowed)
        block[start : start + length, start : start + length] = True
        rows = allowed[start : start + length]
        assert torch.equal(rows, block[start : start + length] & torch.ones_like(rows).tril(start))
        assert batch.inputs["labels"][r, start] == IGNORE_INDEX  # no example learns the next one's first token
    bool_batch = next(make_batches(examples, block_len=128, batch_size=2, pad_id=0, seed=0, mask_dtype=torch.bool))
    assert torch.equal(bool_batch.inputs["attention_mask"], mask == 0)


def test_unpacked_batches_pad_to_the_longest_example_in_the_batch(tokenizer, examples):
    for batch in make_batches(
        examples, block_len=128, batch_size=3, packing=False, pad_id=tokenizer.pad_token_id, seed=0
    ):
        real = batch.inputs["attention_mask"].sum(dim=1)
        assert batch.inputs["input_ids"].shape[1] == int(real.max())
        assert batch.n_tokens == int(real.sum())
        padded = batch.inputs["attention_mask"] == 0
        assert (batch.inputs["input_ids"][padded] == tokenizer.pad_token_id).all()
        assert (batch.inputs["labels"][padded] == IGNORE_INDEX).all()


def test_shuffling_is_deterministic_by_seed_and_changes_with_the_epoch(examples):
    lengths = [len(e) for e in examples]
    first = plan_epoch(lengths, block_len=128, batch_size=1, seed=7, epoch=0)
    assert plan_epoch(lengths, block_len=128, batch_size=1, seed=7, epoch=0) == first
    assert plan_epoch(lengths, block_len=128, batch_size=1, seed=7, epoch=1) != first
    assert plan_epoch(lengths, block_len=128, batch_size=1, seed=8, epoch=0) != first


@pytest.mark.parametrize("packing", [True, False])
def test_two_ranks_together_see_exactly_the_rows_of_one_rank(examples, packing):
    common = dict(block_len=128, packing=packing, pad_id=0, seed=1)
    single = list(make_batches(examples, batch_size=4, **common))
    ranks = [list(make_batches(examples, batch_size=2, rank=r, world_size=2, **common)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for one, r0, r1 in zip(single, *ranks, strict=True):

        def rows(b):
            return {tuple(x for x in row.tolist() if x != 0) for row in b.inputs["input_ids"]} - {()}

        assert rows(one) == rows(r0) | rows(r1)
        assert one.n_loss_tokens == r0.n_loss_tokens + r1.n_loss_tokens


def test_a_rank_without_rows_at_the_end_gets_a_padding_row_without_loss(examples):
    lengths = [len(e) for e in examples]
    n_rows = sum(len(step) for step in plan_epoch(lengths, block_len=128, batch_size=1, packing=False, seed=0))
    world = n_rows + 1  # more ranks than rows: the last rank has nothing to do
    last = list(
        make_batches(
            examples,
            block_len=128,
            batch_size=1,
            packing=False,
            pad_id=0,
            seed=0,
            rank=world - 1,
            world_size=world,
        )
    )
    assert len(last) == 1 and last[0].n_loss_tokens == 0 and last[0].n_examples == 0


def test_resuming_from_a_data_position_yields_exactly_the_remaining_batches(examples):
    common = dict(block_len=128, batch_size=2, pad_id=0, seed=5)
    epoch1 = list(make_batches(examples, position=DataPosition(1, 0), **common))
    assert len(epoch1) == count_batches([len(e) for e in examples], block_len=128, batch_size=2, seed=5, epoch=1)
    position = DataPosition.from_dict(epoch1[1].next_position.to_dict())
    assert position == DataPosition(1, 2)
    resumed = list(make_batches(examples, position=position, **common))
    assert [b.position for b in resumed] == [b.position for b in epoch1[2:]]
    for a, b in zip(resumed, epoch1[2:], strict=True):
        assert all(torch.equal(a.inputs[k], b.inputs[k]) for k in a.inputs)
    assert epoch1[-1].is_last_in_epoch and epoch1[-1].next_position == DataPosition(2, 0)


def test_examples_longer_than_the_block_are_rejected_with_advice(examples):
    with pytest.raises(ValueError, match="max_seq_len <= block_len"):
        plan_epoch([len(e) for e in examples], block_len=8, batch_size=1, seed=0)


@pytest.mark.parametrize("packing", [True, False])
def test_loss_positions_are_the_positions_whose_next_token_carries_loss(examples, packing):
    for batch in make_batches(examples, block_len=128, batch_size=3, packing=packing, pad_id=0, seed=2,
                              block_mask="varlen"):
        labels = batch.inputs["labels"]
        carries = torch.zeros_like(labels, dtype=torch.bool)
        carries[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
        assert torch.equal(batch.loss_positions, carries.flatten().nonzero().squeeze(1))
        assert batch.n_loss_tokens == len(batch.loss_positions)
        bounds = batch.inputs["cu_seq_lens_q"].tolist()
        assert list(batch.inputs["cu_seq_lens_host"]) == bounds and bounds[-1] == labels.numel()
        assert batch.inputs["max_length_q"] == max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
