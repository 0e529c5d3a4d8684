"""Training throughput and peak memory: our loop (workers.loop.train) vs HF Trainer + PEFT, side by side.

Usage: .venv/bin/python bench/train_throughput.py [--steps 8] [--seq 512] [--batch 4] [--vocab 32000]

What is compared, on the same model, data and effective batch:
  ours: workers.loop.train on a TrainingSpec: packing on (best-fit, no attention across examples),
        logits and loss only at positions that carry loss, loss normalised by loss tokens.
  hf:   transformers.Trainer + peft.get_peft_model, the usual script: examples padded to the longest
        in each micro-batch (DataCollatorForSeq2Seq-style), logits over every position.
Both: the same Llama-shaped base (fp32, 4 layers, hidden 256, GQA, vocab --vocab so the output head
costs what it costs in a real model), LoRA r=16 on every attention and MLP projection, AdamW,
gradient checkpointing (non-reentrant), the same tokenized examples and labels (loss on assistant
turns only). The data is chat with a realistic spread of lengths (log-normal, 20..~500 tokens).
Same effective batch: ours takes --batch packed rows of --seq tokens per step; HF takes --batch
examples per micro-batch and accumulates as many micro-batches as it takes for the same number of
examples per optimizer step.

Figures: tokens/s counts real (non-padding) tokens consumed. Each side runs in its own subprocess
with one torch thread; the step times are CPU time (time.process_time) of steps 2..N, because on the
shared 2-core dev machine wall-clock time swings 2-5x with the other processes' load while
single-thread CPU time holds. Wall-clock tokens/s is printed too. Peak memory is the subprocess's
peak RSS (VmHWM) with MALLOC_MMAP_THRESHOLD_=64 KiB, so freed large tensors go back to the OS and the
high-water mark tracks live memory; it includes the model and Python (the same for both).
A third run, ours-unpacked (our loop with packing off, HF's batch and accumulation), splits the gain
between packing and the rest (logits only where a loss is taken; our LoRA layer).
Prints `throughput ratio ours/hf: X` and `peak memory ratio ours/hf: Y`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_WORDS = "the a of to and in is it you that he was for on are with as his they be at one have this".split()


def _write_data(path: Path, n: int, seed: int) -> Path:
    """Chat JSONL whose lengths spread like real SFT data: many short turns, a long tail."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            n_prompt = min(300, max(5, int(rng.lognormvariate(3.4, 0.8))))  # words; median ~30
            n_reply = min(200, max(3, int(rng.lognormvariate(3.0, 0.9))))  # median ~20
            record = {
                "messages": [
                    {"role": "user", "content": " ".join(rng.choice(_WORDS) for _ in range(n_prompt))},
                    {"role": "assistant", "content": " ".join(rng.choice(_WORDS) for _ in range(n_reply))},
                ]
            }
            f.write(json.dumps(record) + "\n")
    return path


def _make_model(out: Path, vocab: int) -> Path:
    from transformers import AutoModelForCausalLM

    from workers.tiny_model import TinyModelShape, make_tiny_model

    shape = TinyModelShape(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=2048)
    make_tiny_model(out, seed=0, shape=shape)
    model = AutoModelForCausalLM.from_pretrained(out)
    # A real vocabulary's output head: the tokenizer uses the first ids only, the cost is the head's width.
    model.resize_token_embeddings(vocab, mean_resizing=False)
    model.save_pretrained(out)
    return out


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _summary(step_cpu: list[float], step_wall: list[float], step_tokens: list[int]) -> dict:
    # Step 1 carries one-off costs (allocator warm-up, first checkpointing graph): leave it out.
    tokens = sum(step_tokens[1:])
    return {
        "tokens_per_cpu_s": tokens / sum(step_cpu[1:]),
        "tokens_per_wall_s": tokens / sum(step_wall[1:]),
        "steps": len(step_cpu),
        "tokens_per_step": tokens / max(1, len(step_tokens) - 1),
        "peak_rss_mib": _peak_rss_mib(),
    }


def _run_ours(args: argparse.Namespace) -> dict:
    from workers.loop import train
    from workers.spec import TrainingSpec

    clock = {"cpu": [time.process_time()], "wall": [time.perf_counter()], "tokens": [0]}
    packed = args.side == "ours"

    class StepClock:
        def log(self, message: str, level: str = "info") -> None:
            pass

        def metrics(self, step: int, values: dict) -> None:
            if step == 0:
                return
            clock["cpu"].append(time.process_time())
            clock["wall"].append(time.perf_counter())
            clock["tokens"].append(int(values["tokens_trained"]))

        def checkpoint(self, step: int, path: Path) -> None:
            pass

        def control(self):
            return None

    spec = TrainingSpec(
        base_model=args.model,
        training_file=args.data,
        max_seq_len=args.seq,
        lora={"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": _TARGETS},
        packing=packed,
        hyperparameters={"n_epochs": 1, "batch_size": args.batch, "learning_rate": 2e-4, "max_steps": args.steps,
                         "warmup_ratio": 0.0, "gradient_accumulation_steps": 1 if packed else args.hf_accumulation},
        n_checkpoints=0,
        gradient_checkpointing=True,
    )
    with tempfile.TemporaryDirectory() as out:
        reporter = StepClock()
        # The clock starts at the first step's end; the setup (loading, tokenising) is not timed.
        train(spec, output_dir=Path(out), reporter=reporter)
    cpu, wall, tokens = clock["cpu"][1:], clock["wall"][1:], clock["tokens"][1:]
    step_cpu = [b - a for a, b in zip(cpu, cpu[1:], strict=False)]
    step_wall = [b - a for a, b in zip(wall, wall[1:], strict=False)]
    step_tokens = [b - a for a, b in zip(tokens, tokens[1:], strict=False)]
    # Differences start at step 2, so pad a dummy step 1 that _summary drops.
    return _summary([0.0, *step_cpu], [0.0, *step_wall], [0, *step_tokens])


def _run_hf(args: argparse.Namespace) -> dict:
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from workers.datasets import read_examples
    from workers.tokenization import IGNORE_INDEX, tokenize_dataset

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    examples = tokenize_dataset(read_examples(args.data), tokenizer, max_seq_len=args.seq)
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples if len(e) >= 2]
    batch_tokens: list[int] = []

    def collate(rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            input_ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            attention_mask[i, :n] = 1
        batch_tokens.append(int(attention_mask.sum()))
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

    clock = {"cpu": [], "wall": []}

    class StepClock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if not clock["cpu"]:
                clock["cpu"].append(time.process_time())
                clock["wall"].append(time.perf_counter())

        def on_step_end(self, *a, **k):
            clock["cpu"].append(time.process_time())
            clock["wall"].append(time.perf_counter())

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=_TARGETS, task_type="CAUSAL_LM")
    )
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=out,
                per_device_train_batch_size=args.batch,
                gradient_accumulation_steps=args.hf_accumulation,
                max_steps=args.steps,
                learning_rate=2e-4,
                gradient_checkpointing=True,
                gradient_checkpointing_kwargs={"use_reentrant": False},
                logging_strategy="no",
                save_strategy="no",
                report_to="none",
                use_cpu=True,
                dataloader_num_workers=0,
                remove_unused_columns=False,
                disable_tqdm=True,
                seed=0,
            ),
            train_dataset=dataset,
            data_collator=collate,
            callbacks=[StepClock()],
        )
        trainer.train()
    step_cpu = [b - a for a, b in zip(clock["cpu"], clock["cpu"][1:], strict=False)]
    step_wall = [b - a for a, b in zip(clock["wall"], clock["wall"][1:], strict=False)]
    acc = args.hf_accumulation
    step_tokens = [sum(batch_tokens[i * acc : (i + 1) * acc]) for i in range(len(step_cpu))]
    return _summary(step_cpu, step_wall, step_tokens)


def _side(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    result = _run_hf(args) if args.side == "hf" else _run_ours(args)
    print("RESULT " + json.dumps(result))


def _examples_per_row(data: Path, model: Path, seq: int) -> float:
    from transformers import AutoTokenizer

    from workers.datasets import read_examples
    from workers.packing import plan_epoch
    from workers.tokenization import tokenize_dataset

    tokenizer = AutoTokenizer.from_pretrained(model)
    examples = tokenize_dataset(read_examples(data), tokenizer, max_seq_len=seq)
    lengths = [len(e) for e in examples]
    rows = sum(len(b) for b in plan_epoch(lengths, block_len=seq, batch_size=1, seed=0))
    print(f"data: {len(lengths)} examples, tokens per example median {sorted(lengths)[len(lengths) // 2]}, "
          f"max {max(lengths)}, mean {sum(lengths) / len(lengths):.0f}; packed into {rows} rows of {seq}")
    return len(lengths) / rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--side", choices=["ours", "ours-unpacked", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--hf-accumulation", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        _side(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        model = _make_model(Path(tmp) / "model", args.vocab)
        data = _write_data(Path(tmp) / "train.jsonl", 1200, seed=0)
        per_row = _examples_per_row(data, model, args.seq)
        hf_accumulation = max(1, round(per_row))  # HF: batch examples x this = ours: batch rows x per_row
        print(f"effective batch: ours {args.batch} packed rows (~{args.batch * per_row:.1f} examples), "
              f"hf {args.batch} x {hf_accumulation} accumulation = {args.batch * hf_accumulation} examples")
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
        results = {}
        for side in ("ours", "ours-unpacked", "hf"):
            cmd = [sys.executable, __file__, "--side", side, "--model", str(model), "--data", str(data),
                   "--steps", str(args.steps), "--seq", str(args.seq), "--batch", str(args.batch),
                   "--hf-accumulation", str(hf_accumulation)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(proc.stdout[-3000:], proc.stderr[-3000:])
                raise SystemExit(f"{side} run failed (exit {proc.returncode})")
            results[side] = json.loads(lines[-1].removeprefix("RESULT "))
            r = results[side]
            print(f"{side:>13}: {r['tokens_per_cpu_s']:8.0f} tokens/CPU-s  {r['tokens_per_wall_s']:7.0f} tokens/wall-s "
                  f"{r['tokens_per_step']:7.0f} real tokens/step  peak RSS {r['peak_rss_mib']:7.0f} MiB")
        ours, unpacked, hf = results["ours"], results["ours-unpacked"], results["hf"]
        print(f"of which packing: ours/ours-unpacked {ours['tokens_per_cpu_s'] / unpacked['tokens_per_cpu_s']:.2f}; "
              f"the rest (logits only where loss is taken, our LoRA layer): ours-unpacked/hf "
              f"{unpacked['tokens_per_cpu_s'] / hf['tokens_per_cpu_s']:.2f}")
        print(f"throughput ratio ours/hf: {ours['tokens_per_cpu_s'] / hf['tokens_per_cpu_s']:.2f} "
              f"(wall-clock: {ours['tokens_per_wall_s'] / hf['tokens_per_wall_s']:.2f})")
        print(f"peak memory ratio ours/hf: {ours['peak_rss_mib'] / hf['peak_rss_mib']:.2f}")
        if not math.isfinite(ours["tokens_per_cpu_s"]):
            raise SystemExit("no timing recorded")


if __name__ == "__main__":
    main()
