"""Forward+backward time and peak memory of one training step: lora_core vs PEFT, fp32 and NF4 bases.

Usage: .venv/bin/python bench/lora_step.py [--rounds 2] [--steps 4] [--variants]

A Llama-shaped model (4 layers, hidden 512, GQA, SwiGLU 1408) gets LoRA r=16 on every linear layer but
lm_head, once through lora_core and once through PEFT (test-only dependency), from the same base weights
and the same batch. Per case it prints one line ending
    time ratio ours/peft: X    memory ratio ours/peft: Y

Time: both wrapped models live in one process and steps alternate ours, peft, peft, ours, ... so drift
and noise from other processes fall on both; the figure is the median step time over all rounds.
Memory: peak RSS growth during one step, in a fresh subprocess per implementation (alternating order).
torch allocates CPU tensors with malloc, which tracemalloc does not see; with MALLOC_MMAP_THRESHOLD_=64 KiB
every tensor over 64 KiB is its own mmap, returned to the OS when freed, so RSS follows live tensor
memory. After a warm-up step we reset the kernel's high-water mark (/proc/self/clear_refs = 5), run
forward+backward, and report VmHWM − VmRSS(before): every byte the step needed at its peak (activations
saved for backward, temporaries, gradients). Linux only.

--variants also times two older versions of our LoRA branch, to show what each optimisation gave:
  naive:   out + (B(A(x̃))) * s          (PEFT's formula: two output-sized temporaries, scale on out)
  scale_r: out + (x̃Aᵀ·s)Bᵀ              (scale on the r-wide intermediate, one output-sized temporary)
  current: out.addmm_(x̃Aᵀ·s, Bᵀ)        (scale on r, fused in-place addmm: no output-sized temporary)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPE = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=4096, max_position_embeddings=512)
BATCH, SEQ = 2, 128
RANK, ALPHA = 16, 32


def make_base(out_dir: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=False)).save_pretrained(out_dir)
    return out_dir


def load(base_dir: Path, quant: str | None):
    import lora_core

    return lora_core.load_base_model(base_dir, quantization=quant, compute_dtype=torch.float32)


def wrap(model, impl: str, variant: str = "current"):
    if impl == "peft":
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        return get_peft_model(model, PeftLoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear",
                                                    task_type="CAUSAL_LM"))
    import lora_core

    _use_variant(variant)
    return lora_core.apply_lora(model, lora_core.LoraConfig(r=RANK, alpha=ALPHA, target_modules="all-linear"))


def _use_variant(variant: str) -> None:
    """Swap in an older formulation of the LoRA branch (bench only) to measure what an optimisation gave."""
    from lora_core.layers import LoraLinear

    def naive(self, out, x, name):
        A, B = self.lora_A[name], self.lora_B[name]
        x_tilde = self.lora_dropout[name](x.to(A.dtype))
        return (out + (x_tilde @ A.T @ B.T) * self.scale[name]).to(out.dtype)

    def scale_r(self, out, x, name):
        A, B = self.lora_A[name], self.lora_B[name]
        x_tilde = self.lora_dropout[name](x.to(A.dtype))
        return (out + ((x_tilde @ A.T) * self.scale[name]) @ B.T).to(out.dtype)

    if variant == "naive":
        LoraLinear._add_lora = naive
    elif variant == "scale_r":
        LoraLinear._add_lora = scale_r


def batch() -> torch.Tensor:
    return torch.randint(3, SHAPE["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def step(model, ids) -> float:
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    elapsed = time.perf_counter() - start
    for p in model.parameters():
        p.grad = None
    return elapsed


# ---- child processes --------------------------------------------------------------------------------


def child_time(base_dir: Path, quant: str | None, steps: int, variants: list[str]) -> dict:
    """Alternate steps over PEFT and our variants, all in this one process; median seconds per impl."""
    models = {"peft": wrap(load(base_dir, quant), "peft").train()}
    for variant in variants:
        models[variant] = wrap(load(base_dir, quant), "ours").train()
    ids = batch()
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for round_ in range(steps + 1):
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            _use_variant(name if name != "peft" else "current")
            elapsed = step(models[name], ids)
            if round_ > 0:  # round 0 warms up
                times[name].append(elapsed)
    return {name: statistics.median(v) for name, v in times.items()}


def child_memory(base_dir: Path, quant: str | None, impl: str, variant: str) -> dict:
    import ctypes
    import gc

    model = wrap(load(base_dir, quant), impl, variant).train()
    ids = batch()
    step(model, ids)  # warm-up: one-time allocations are not part of a step
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    peak = _status_kib("VmHWM")
    return {"peak_step_bytes": (peak - before) * 1024}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


# ---- parent -----------------------------------------------------------------------------------------


def run_child(*args: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536",
               TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bench child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per implementation and round")
    parser.add_argument("--rounds", type=int, default=2, help="memory measurements per implementation")
    parser.add_argument("--variants", action="store_true", help="also time older versions of our branch")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, base_dir, quant, *rest = args.child
        quant_arg = None if quant == "none" else quant
        if mode == "time":
            result = child_time(Path(base_dir), quant_arg, int(rest[0]), rest[1].split(","))
        else:
            result = child_memory(Path(base_dir), quant_arg, rest[0], rest[1])
        print(json.dumps(result))
        return

    torch.set_num_threads(torch.get_num_threads())
    variants = ["current", "scale_r", "naive"] if args.variants else ["current"]
    shape = ", ".join(f"{k}={v}" for k, v in SHAPE.items())
    print(f"# Llama-shaped {shape}; batch {BATCH}x{SEQ}; LoRA r={RANK} all-linear; "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads")
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = make_base(Path(tmp) / "base")
        for quant in ("none", "nf4"):
            label = "fp32 base" if quant == "none" else "nf4 base (fp32 compute)"
            times = run_child("time", str(base_dir), quant, str(args.steps), ",".join(variants))
            memory: dict[str, list[int]] = {"ours": [], "peft": []}
            for round_ in range(args.rounds):
                for impl in (("ours", "peft") if round_ % 2 == 0 else ("peft", "ours")):
                    memory[impl].append(run_child("memory", str(base_dir), quant, impl, "current")["peak_step_bytes"])
            mem_ours, mem_peft = min(memory["ours"]), min(memory["peft"])
            for variant in variants[1:]:
                print(f"{label}, variant {variant}: {times[variant] * 1e3:.1f} ms/step "
                      f"(time ratio {variant}/peft: {times[variant] / times['peft']:.3f})")
            print(f"{label}: ours {times['current'] * 1e3:.1f} ms/step, {mem_ours / 2**20:.1f} MiB; "
                  f"peft {times['peft'] * 1e3:.1f} ms/step, {mem_peft / 2**20:.1f} MiB; "
                  f"time ratio ours/peft: {times['current'] / times['peft']:.3f}  "
                  f"memory ratio ours/peft: {mem_ours / mem_peft:.3f}")


if __name__ == "__main__":
    main()
