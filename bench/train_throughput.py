"""Training throughput and peak memory: our loop vs HF Trainer + PEFT vs TRL SFTTrainer (packed) + PEFT, side by side.

Usage: .venv/bin/python bench/train_throughput.py [--steps 8] [--seq 512] [--batch 4] [--vocab 32000]

What is compared, on the same model, data and effective batch (the sides live in bench/sides.py):
  ours: workers.loop.train on a TrainingSpec: packing on (best-fit, no attention across examples),
        logits and loss only at positions that carry loss, loss normalised by loss tokens.
  hf:   transformers.Trainer + peft.get_peft_model, the usual script: examples padded to the longest
        in each micro-batch (DataCollatorForSeq2Seq-style), logits over every position.
  trl:  trl.SFTTrainer + PEFT as an informed user runs it today: `packing=True` with the default
        "bfd" strategy (best-fit decreasing, padding-free: the packed rows are one flat sequence with
        position ids restarting per example), `assistant_only_loss=True` (the tiny model's chat template
        has `{% generation %}` markers), so the loss is on the same tokens as ours. TRL tokenizes and
        packs the raw chat records itself.
All: the same Llama-shaped base (fp32, 4 layers, hidden 256, GQA, vocab --vocab so the output head
costs what it costs in a real model), LoRA r=16 on every attention and MLP projection, AdamW,
gradient checkpointing (non-reentrant), fp32 throughout (TRL's default bf16 is turned off: the CPU
runs compare fp32 with fp32). The data is chat with a realistic spread of lengths (log-normal,
20..~500 tokens), loss on assistant turns only.
Same effective batch: ours and trl take --batch packed rows of --seq tokens per step; HF takes --batch
examples per micro-batch and accumulates as many micro-batches as it takes for the same number of
examples per optimizer step.

Figures: tokens/s counts real (non-padding) tokens consumed. Each side runs in its own subprocess
with one torch thread; the step times are CPU time (time.process_time) of steps 2..N, because on the
shared 2-core dev machine wall-clock time swings 2-5x with the other processes' load while
single-thread CPU time holds. Wall-clock tokens/s is printed too. Peak memory is the subprocess's
peak RSS (VmHWM) with MALLOC_MMAP_THRESHOLD_=64 KiB, so freed large tensors go back to the OS and the
high-water mark tracks live memory; it includes the model and Python (the same for all sides).
A fourth run, ours-unpacked (our loop with packing off, HF's batch and accumulation), splits the gain
between packing and the rest (logits only where a loss is taken; our LoRA layer).
Prints `throughput ratio ours/hf: X`, `throughput ratio ours/trl: X` and the peak memory ratios.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

from sides import Setup, data_stats, make_llama, run_side, write_chat_data

_SIDES = ("ours", "ours-unpacked", "hf", "trl")


def main(argv: list[str] | None = None) -> None:
    from workers.tiny_model import TinyModelShape

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--sides", nargs="+", choices=_SIDES, default=list(_SIDES), help="which sides to run")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        shape = TinyModelShape(vocab_size=args.vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
        model = make_llama(Path(tmp) / "model", shape)
        data = write_chat_data(Path(tmp) / "train.jsonl", 1200, seed=0)
        stats = data_stats(data, model, args.seq)
        print(f"data: {stats.describe(args.seq)} (our tokenization)")
        per_row = stats.examples_per_row
        hf_accumulation = max(1, round(per_row))  # HF: batch examples x this = ours: batch rows x per_row
        print(f"effective batch: ours and trl {args.batch} packed rows (~{args.batch * per_row:.1f} examples), "
              f"hf {args.batch} x {hf_accumulation} accumulation = {args.batch * hf_accumulation} examples")
        env = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
        results = {}
        for side in args.sides:
            setup = Setup(side=side, model=str(model), data=str(data), seq=args.seq, batch=args.batch,
                          steps=args.steps, hf_accumulation=hf_accumulation)
            r = results[side] = run_side(setup, env=env)
            share = f"{r['loss_token_share']:.1%}" if r["loss_token_share"] is not None else "  -  "
            print(f"{side:>13}: {r['tokens_per_cpu_s']:8.0f} tokens/CPU-s  {r['tokens_per_wall_s']:7.0f} tokens/wall-s "
                  f"{r['tokens_per_step']:7.0f} real tokens/step  loss on {share}  peak RSS {r['peak_mib']:7.0f} MiB")
        if not all(math.isfinite(r["tokens_per_cpu_s"]) for r in results.values()):
            raise SystemExit("no timing recorded")
        ours = results.get("ours")
        if ours and "ours-unpacked" in results and "hf" in results:
            unpacked, hf = results["ours-unpacked"], results["hf"]
            packing = ours["tokens_per_cpu_s"] / unpacked["tokens_per_cpu_s"]
            print(f"of which packing: ours/ours-unpacked {packing:.2f}; "
                  f"the rest (logits only where loss is taken, our LoRA layer): ours-unpacked/hf "
                  f"{unpacked['tokens_per_cpu_s'] / hf['tokens_per_cpu_s']:.2f}")
        for other in ("hf", "trl"):
            if ours and other in results:
                theirs = results[other]
                print(f"throughput ratio ours/{other}: {ours['tokens_per_cpu_s'] / theirs['tokens_per_cpu_s']:.2f} "
                      f"(wall-clock: {ours['tokens_per_wall_s'] / theirs['tokens_per_wall_s']:.2f})")
                print(f"peak memory ratio ours/{other}: {ours['peak_mib'] / theirs['peak_mib']:.2f}")


if __name__ == "__main__":
    main()
