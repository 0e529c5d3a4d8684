"""GPU suite: tokens/s, MFU and peak memory of ours vs HF Trainer + PEFT vs TRL packed + PEFT, plus DDP scaling.

Usage: python bench/gpu_suite.py [--steps 10] [--warmup 3] [--seq 2048] [--batch 8] [--peak-tflops T]
(sized for ~8 minutes on one H200, an estimate not yet timed on one; exits with a message without CUDA)

Model: Llama-shaped, random weights built from a config (no download): hidden 2048, 16 layers, 32 heads,
8 KV heads (GQA), SwiGLU 5632, vocab 32 000, untied head: 0.85 B parameters (0.72 B in the decoder
layers), stored in bf16. LoRA r=16 on q,k,v,o,gate,up,down, dropout 0, AdamW, non-reentrant gradient
checkpointing on every side. Data: synthetic chat with log-normal lengths (median ~450 tokens, long
tail truncated at --seq), loss on assistant turns only. Sides as in bench/sides.py: ours and TRL take
--batch packed rows of --seq tokens per step, HF the same number of examples padded per micro-batch.
Precisions: bf16 (bf16 base, bf16 autocast, fp32 adapters) and nf4 (bitsandbytes NF4 + double quant
base, bf16 compute). TRL also runs with Liger kernels (`use_liger_kernel=True`) where liger-kernel is
installed; padding-free TRL uses flash_attention_2 where flash-attn is installed, sdpa otherwise.

Figures, over the steps after --warmup (each side in a fresh process, the clock read after
torch.cuda.synchronize() at each step's end):
  tokens/s   real (non-padding) tokens consumed per wall-clock second
  MFU        tokens/s × FLOPs per token / the device's peak dense bf16 FLOP/s (H100 SXM and H200 989 T,
             H100 PCIe 756 T, H100 NVL 835 T, A100 312 T; --peak-tflops overrides). FLOPs per token:
             4·N_frozen + 6·N_lora (frozen decoder weights need the forward and the input gradient,
             adapters also their weight gradient) + 4·hidden·vocab × the share of tokens that carry loss
             (the output head is needed only there) + attention: per layer, a document of n tokens costs
             6·d·n·(n+1) FLOPs, d = heads × head_dim (QKᵀ and PV over the n(n+1)/2 causal pairs, 2 FLOPs
             per multiply-add, backward twice the forward), averaged over the data's documents. The same
             useful work is credited to every side; recomputation (checkpointing), padding, attention
             across packed examples and NF4 dequantization are not counted.
  peak mem   torch.cuda.max_memory_allocated() of the side's process (rank 0 under DDP)
DDP scaling: ours in bf16 on 2 GPUs (torchrun, one rank per GPU, --batch rows per rank) vs 1 GPU,
tokens/s ratio; skipped with a message where fewer than 2 GPUs are visible.
Co-training (bench/cotrain.py, on the same base, in each of --precisions): 4 jobs with LoRA r 8/16/16/32
on their own data, --cotrain-batch rows of --seq tokens each per step, --cotrain-steps steps: one process
co-training them (workers.cotrain.train_group) vs 4 processes sharing the GPU at once vs 4 one after another;
tokens/s and the sum of the processes' torch.cuda.max_memory_allocated(). --cotrain-steps 0 skips it.
--cpu-smoke runs the same plumbing on CPU with a tiny model to check the script itself (figures meaningless).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import tempfile
from pathlib import Path

from cotrain import report as report_cotrain
from cotrain import run_sides as run_cotrain_sides
from cotrain import write_jobs as write_cotrain_jobs
from sides import Setup, data_stats, make_llama, run_side, write_chat_data

_LORA_R = 16  # what bench/sides.py trains
# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s; the longest matching name wins.
_PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "A100": 312.0}


def _peak_flops(device_name: str, override_tflops: float | None) -> float | None:
    if override_tflops is not None:
        return override_tflops * 1e12
    matches = [key for key in _PEAK_BF16_TFLOPS if key in device_name]
    return _PEAK_BF16_TFLOPS[max(matches, key=len)] * 1e12 if matches else None


def _weights_per_layer(config, lora_r: int) -> tuple[int, int]:
    """(frozen, LoRA) weights of one decoder layer: q, k, v, o and the SwiGLU MLP, r-wide A and B per module."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_width, kv_width = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    frozen = hidden * q_width + 2 * hidden * kv_width + q_width * hidden + 3 * hidden * inter
    lora = lora_r * ((hidden + q_width) + 2 * (hidden + kv_width) + (q_width + hidden) + 3 * (hidden + inter))
    return frozen, lora


def flops_per_token(config, lora_r: int, lengths: list[int], loss_share: float) -> float:
    """Model FLOPs per trained token (see the module docstring); `lengths` are the documents' token counts."""
    frozen, lora = _weights_per_layer(config, lora_r)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    d = config.num_attention_heads * head_dim
    attention = 6 * d * sum(n * (n + 1) for n in lengths) / sum(lengths)  # per layer, per token
    per_layer = 4 * frozen + 6 * lora + attention
    return config.num_hidden_layers * per_layer + 4 * config.hidden_size * config.vocab_size * loss_share


def _row(name: str, r: dict, flops_token: float, peak: float | None) -> str:
    tps = r["tokens_per_wall_s"]
    mfu = f"{tps * flops_token / peak:6.1%}" if peak else "   n/a"
    return f"  {name:>10}: {tps:9.0f} tokens/s  MFU {mfu}  peak mem {r['peak_mib'] / 1024:6.2f} GiB"


def _run(setup: Setup, **kwargs) -> dict | None:
    """One side's figures, or None (reported) when it failed: the rest of the suite still runs."""
    try:
        return run_side(setup, **kwargs)
    except SystemExit as e:
        print(f"  {setup.side:>10}: FAILED: {e}")
        return None


def main(argv: list[str] | None = None) -> None:
    import torch
    from transformers import AutoConfig

    from workers.tiny_model import TinyModelShape

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per side, warmup included")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the figures")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8, help="packed rows (ours, TRL) or examples (HF) per step")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--peak-tflops", type=float, help="the device's peak dense bf16 TFLOP/s, for MFU")
    parser.add_argument("--precisions", nargs="+", choices=["bf16", "nf4"], default=["bf16", "nf4"])
    parser.add_argument("--cotrain-steps", type=int, default=8, help="co-training comparison: steps per job (0: skip)")
    parser.add_argument("--cotrain-batch", type=int, default=2, help="co-training comparison: rows per job per step")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU: checks the script only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        raise SystemExit("bench/gpu_suite.py needs a CUDA GPU and torch.cuda.is_available() is False here. "
                         "On CPU, run bench/train_throughput.py (or this script with --cpu-smoke to check it).")
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")

    device = "cpu" if args.cpu_smoke else "cuda"
    if args.cpu_smoke:
        shape = TinyModelShape(vocab_size=4096, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
        device_name, scale = "CPU (smoke run)", 1.0
    else:
        shape = TinyModelShape(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                               num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=8,
                               max_position_embeddings=max(4096, args.seq))
        device_name, scale = torch.cuda.get_device_name(0), 4.0
    peak = None if args.cpu_smoke else _peak_flops(device_name, args.peak_tflops)

    with tempfile.TemporaryDirectory() as tmp:
        model = make_llama(Path(tmp) / "model", shape, device=device, dtype="bfloat16")
        config = AutoConfig.from_pretrained(model)
        data = write_chat_data(Path(tmp) / "train.jsonl", 800, seed=0, scale=scale)
        stats = data_stats(data, model, args.seq)
        hf_accumulation = max(1, round(stats.examples_per_row))
        if args.steps * args.batch * hf_accumulation > len(stats.lengths):
            raise SystemExit(f"{len(stats.lengths)} examples are too few for HF's {args.steps} steps of "
                             f"{args.batch} x {hf_accumulation}: lower --steps or --batch")
        flops_token = flops_per_token(config, _LORA_R, stats.lengths, stats.loss_share)
        print(f"device: {device_name}; peak bf16 {peak / 1e12:.0f} TFLOP/s" if peak else
              f"device: {device_name}; peak bf16 unknown (pass --peak-tflops for MFU)")
        frozen, lora = _weights_per_layer(config, _LORA_R)
        n_params = config.num_hidden_layers * frozen + 2 * config.hidden_size * config.vocab_size
        print(f"model: {config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} "
              f"heads / {config.num_key_value_heads} KV, SwiGLU {config.intermediate_size}, vocab {config.vocab_size}: "
              f"{n_params / 1e9:.2f} B parameters, LoRA r={_LORA_R} {config.num_hidden_layers * lora / 1e6:.1f} M; "
              f"{flops_token / 1e9:.2f} GFLOP per trained token")
        print(f"data: {stats.describe(args.seq)}; per step: ours/TRL {args.batch} rows of {args.seq}, "
              f"HF {args.batch} x {hf_accumulation} examples; {args.steps} steps, first {args.warmup} not timed")
        common = dict(model=str(model), data=str(data), seq=args.seq, batch=args.batch, steps=args.steps,
                      hf_accumulation=hf_accumulation, warmup=args.warmup, device=device, threads=None, lora_r=_LORA_R)
        sides = ["ours", "hf", "trl"]
        if importlib.util.find_spec("liger_kernel") and not args.cpu_smoke:
            sides.append("trl+liger")
        else:
            print("trl+liger: skipped (liger-kernel is not installed, or no CUDA)")

        single_gpu_ours = None
        for precision in args.precisions:
            print(f"{precision}:")
            results = {}
            for side in sides:
                r = _run(Setup(side=side, precision=precision, **common))
                if r is not None:
                    results[side] = r
                    print(_row(side, r, flops_token, peak), flush=True)
            ours = results.get("ours")
            for other in sides[1:]:
                if ours and other in results:
                    theirs = results[other]
                    print(f"  ours/{other}: tokens/s {ours['tokens_per_wall_s'] / theirs['tokens_per_wall_s']:.2f}, "
                          f"peak memory {ours['peak_mib'] / theirs['peak_mib']:.2f}")
            if precision == "bf16":
                single_gpu_ours = ours

        n_gpus = torch.cuda.device_count()
        if n_gpus < 2:
            print(f"DDP scaling: skipped ({n_gpus} GPU visible; needs 2)")
        elif single_gpu_ours is None:
            print("DDP scaling: skipped (no 1-GPU bf16 figure for ours to compare with)")
        else:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
            r = _run(Setup(side="ours", precision="bf16", **common), launcher=launcher)
            if r is not None:
                print(_row("ours 2 GPU", r, flops_token, peak * 2 if peak else None))
                ratio = r["tokens_per_wall_s"] / single_gpu_ours["tokens_per_wall_s"]
                print(f"DDP scaling 2 GPU / 1 GPU: {ratio:.2f}x (ideal 2.00)")
        if args.cotrain_steps:
            jobs = write_cotrain_jobs(Path(tmp) / "cotrain", scale=scale)
            for precision in args.precisions:  # nf4: the catalog's default; its dequantization is shared in a group
                print(f"co-training: 4 jobs, LoRA r 8/16/16/32, {args.cotrain_batch} rows of {args.seq} tokens per "
                      f"job per step, {args.cotrain_steps} steps (the first not timed), {precision}:", flush=True)
                figures = run_cotrain_sides(model, jobs, seq=args.seq, batch=args.cotrain_batch,
                                            steps=args.cotrain_steps, device=device, threads=4,
                                            quantization="nf4" if precision == "nf4" else None)
                report_cotrain(figures, cuda=not args.cpu_smoke)
        if not math.isfinite(flops_token):
            raise SystemExit("FLOP count failed")


if __name__ == "__main__":
    main()
