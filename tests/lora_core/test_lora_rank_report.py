"""The rank report: σ(ΔW) from the small factors against a dense SVD, verdicts, and a saved adapter's report."""

from __future__ import annotations

import json

import torch

import lora_core
from lora_core import LoraConfig, apply_lora


def test_rank_report_matches_a_dense_svd(load_tiny, randomize):
    model = apply_lora(load_tiny(), LoraConfig(r=8, alpha=16, target_modules=["q_proj", "down_proj"]))
    randomize(model)
    report = lora_core.rank_report(model)
    assert len(report.modules) == 8
    for entry in report.modules:
        layer = model.get_submodule(entry.module)
        dense = torch.linalg.svdvals(layer.delta_weight("default").double())[:8]
        torch.testing.assert_close(torch.tensor(entry.singular_values, dtype=torch.float64), dense,
                                   rtol=1e-6, atol=1e-9)
        assert 1 <= entry.effective_rank_90 <= entry.effective_rank_99 <= 8
    assert "rank report for adapter 'default'" in str(report)


def test_rank_report_verdicts():
    from torch import nn

    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64))
    apply_lora(model, LoraConfig(r=8, target_modules=["0", "1", "2"]))
    with torch.no_grad():
        # layer 0: rank-1 update -> larger than needed; layer 1: 8 equal directions -> too small; layer 2: untrained
        u, v = torch.randn(64, 1), torch.randn(1, 64)
        model[0].lora_B["default"].zero_()[:, :1] = u
        model[0].lora_A["default"].copy_(torch.cat([v, torch.zeros(7, 64)]))
        q, _ = torch.linalg.qr(torch.randn(64, 8))
        model[1].lora_B["default"].copy_(q)
        model[1].lora_A["default"].copy_(q.T)
    report = lora_core.rank_report(model)
    assert [m.verdict for m in report.modules] == ["larger_than_needed", "too_small", "untrained"]
    assert [m.effective_rank_99 for m in report.modules] == [1, 8, 0]


def test_effective_rank_counts_energy():
    assert lora_core.effective_rank(torch.tensor([3.0, 1.0, 0.0]), 0.9) == 1
    assert lora_core.effective_rank(torch.tensor([3.0, 1.0, 0.0]), 0.99) == 2
    assert lora_core.effective_rank(torch.zeros(4), 0.9) == 0


def test_a_saved_adapters_report_is_the_models_and_serialises_to_json(load_tiny, randomize, tmp_path):
    model = apply_lora(load_tiny(), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True))
    randomize(model)
    lora_core.save_adapter(model, tmp_path / "adapter")
    in_memory = lora_core.rank_report(model)
    saved = lora_core.adapter_rank_report(tmp_path / "adapter")
    assert [m.module for m in saved.modules] == sorted(m.module for m in in_memory.modules)
    by_module = {m.module: m for m in in_memory.modules}
    for entry in saved.modules:
        torch.testing.assert_close(torch.tensor(entry.singular_values),
                                   torch.tensor(by_module[entry.module].singular_values), rtol=1e-5, atol=1e-8)
        assert entry.verdict == by_module[entry.module].verdict
    as_json = json.loads(json.dumps(saved.to_json()))  # plain JSON types only
    assert as_json["energy"] == 0.9
    assert as_json["summary"]["verdict"] == saved.verdict
    assert as_json["summary"]["message"].startswith(lora_core.report.VERDICT_ADVICE[saved.verdict])
    assert as_json["summary"]["modules"] == len(saved.modules) == len(in_memory.modules)
    assert {"module", "r", "singular_values", "effective_rank_90", "effective_rank_99", "verdict",
            "note"} <= set(as_json["modules"][0])
    assert len(as_json["modules"][0]["singular_values"]) == 4


def test_larger_than_needed_always_names_a_smaller_rank():
    """90 % of ΔW in a quarter of the directions, but 99 % needs more than half of them: no smaller
    power-of-two rank would hold it, so the rank is adequate, not 'larger than needed; r=16 would do'."""
    from lora_core.report import _module_rank

    r = 16
    q_out, _ = torch.linalg.qr(torch.randn(128, r, dtype=torch.float64))
    q_in, _ = torch.linalg.qr(torch.randn(128, r, dtype=torch.float64))
    # 4 strong directions (≈ 91 % of the energy), then 8 weak ones (≈ 9 %): e90 = 4, e99 = 12.
    sigma = torch.tensor([10.0] * 4 + [5**0.5] * 8 + [0.0] * 4, dtype=torch.float64)
    entry = _module_rank("m", q_in.T.contiguous(), q_out * sigma, 1.0)
    assert (entry.effective_rank_90, entry.effective_rank_99) == (4, 12)
    assert entry.verdict == "adequate", entry.note
    for r_small, e90, e99 in [(16, 2, 3), (8, 2, 4), (4, 1, 2)]:  # a smaller rank would do: it is named
        sigma = torch.tensor([10.0] * e90 + [1.0] * (e99 - e90) + [0.0] * (r_small - e99), dtype=torch.float64)
        entry = _module_rank("m", q_in[:, :r_small].T.contiguous(), q_out[:, :r_small] * sigma, 1.0)
        assert entry.verdict == "larger_than_needed", (r_small, entry)
        suggested = int(entry.note.rsplit("r=", 1)[1].split()[0])
        assert suggested < r_small, entry.note
