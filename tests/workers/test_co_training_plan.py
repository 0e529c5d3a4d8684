"""The co-training memory estimate (workers/co_training_plan.py): pure arithmetic over a config.json."""

from __future__ import annotations

import json

from workers.co_training_plan import group_memory

GIB = 2**30
# Llama-3-8B's shape: 32 layers, H 4096, 8 KV heads of 128, MLP 14336, vocab 128256.
LLAMA_8B = {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "tie_word_embeddings": False}


def test_an_nf4_8b_base_on_80_gib_leaves_room_for_several_members_and_bf16_for_fewer(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    nf4 = group_memory(tmp_path, "nf4", device_bytes=80 * GIB, leader_rank=16)
    bf16 = group_memory(tmp_path, None, device_bytes=80 * GIB, leader_rank=16)
    member = nf4.member_fixed_bytes + 16 * nf4.bytes_per_rank
    assert nf4.budget_bytes // member >= 3  # the case: ~4 GiB of base, most of the device for members
    assert bf16.budget_bytes < nf4.budget_bytes  # the same members on a 16 GiB base
    # adapter state per unit rank: 16 bytes × every linear layer's (in + out), 32 layers
    assert nf4.bytes_per_rank == 16 * 32 * (9 * 4096 + 2 * 1024 + 3 * 14336)


def test_a_higher_leader_rank_leaves_less(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    small = group_memory(tmp_path, "nf4", device_bytes=24 * GIB, leader_rank=8)
    big = group_memory(tmp_path, "nf4", device_bytes=24 * GIB, leader_rank=256)
    assert big.budget_bytes == small.budget_bytes - 248 * small.bytes_per_rank


def test_a_base_without_a_readable_config_leaves_nothing_for_members(tmp_path):
    memory = group_memory(tmp_path / "missing", "nf4", device_bytes=80 * GIB, leader_rank=8)
    assert memory.budget_bytes == 0 and memory.member_fixed_bytes > 0
