"""Forward+backward time and peak memory of one training step: lora_core vs PEFT, fp32 and NF4 bases.

Usage: .venv/bin/python bench/lora_step.py [--steps 8] [--variants] [--rss]

A Llama-shaped model (4 layers, hidden 512, GQA, SwiGLU 1408) gets LoRA r=16 on every linear layer but
lm_head, once through lora_core and once through PEFT (test-only dependency), from the same base weights
and the same batch. Per case it prints one line ending
    time ratio ours/peft: X    memory ratio ours/peft: Y

Time: both wrapped models live in one process and steps alternate ours, peft, peft, ours, ... so drift
falls on both; the figure is the median over all rounds of the CPU time of one step (time.process_time)
with one torch thread. The dev machine is 2 cores shared by several busy processes: wall-clock time there
swings by 2-5x with the load (and multi-threaded OpenMP spins while descheduled), while single-thread CPU
time stays within a few percent. Wall time is printed too.
Memory: the peak of live torch tensor bytes during one forward+backward, above what was live before it
(activations saved for backward, temporaries, gradients), from the allocation and free events the torch
profiler records with profile_memory=True, summed in time order. tracemalloc cannot see torch's CPU
tensors (they come from malloc in C++), and process RSS mixes in allocator caching; the profiler sees
every tensor allocation of the step exactly. It is measured after the timed steps, on the same models.
--rss adds a cross-check: peak RSS growth during one step in a fresh subprocess per implementation, with
MALLOC_MMAP_THRESHOLD_=64 KiB so every tensor over 64 KiB is its own mmap returned to the OS when freed,
the kernel's high-water mark reset (/proc/self/clear_refs = 5) after a warm-up step, then VmHWM − VmRSS.

--variants also times older versions of our LoRA branch, to show what each optimisation gave:
  naive:   out + (B(A(x̃))) * s          (PEFT's formula: two output-sized temporaries, scale on out)
  scale_r: out + (x̃Aᵀ·s)Bᵀ              (scale on the r-wide intermediate, one output-sized temporary)
  addmm:   out.addmm_(x̃Aᵀ·s, Bᵀ)        (plus fused in-place addmm: no output-sized temporary)
  current: the same as one autograd.Function (one graph node; x saved in the base dtype, not as an
           fp32 copy, and dropout in the base dtype)
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
from tensor_memory import peak_live_tensor_bytes

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
    """fp32 dense base, or NF4 computing in bf16 (the usual QLoRA setting)."""
    import lora_core

    dtype = torch.float32 if quant is None else torch.bfloat16
    return lora_core.load_base_model(base_dir, quantization=quant, compute_dtype=dtype)


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

    def addmm(self, out, x, name):
        A, B = self.lora_A[name], self.lora_B[name]
        x_tilde = self.lora_dropout[name](x.to(A.dtype))
        t = ((x_tilde @ A.T) * self.scale[name]).reshape(-1, A.shape[0])
        if out.dtype == A.dtype:
            return out.reshape(-1, out.shape[-1]).addmm_(t, B.T).view(out.shape)
        return torch.addmm(out.reshape(-1, out.shape[-1]).to(A.dtype), t, B.T).view(out.shape).to(out.dtype)

    def scale_r(self, out, x, name):
        A, B = self.lora_A[name], self.lora_B[name]
        x_tilde = self.lora_dropout[name](x.to(A.dtype))
        return (out + ((x_tilde @ A.T) * self.scale[name]) @ B.T).to(out.dtype)

    if not hasattr(LoraLinear, "_current_add_lora"):
        LoraLinear._current_add_lora = LoraLinear._add_lora
    LoraLinear._add_lora = {"naive": naive, "scale_r": scale_r, "addmm": addmm}.get(
        variant, LoraLinear._current_add_lora)


def batch() -> torch.Tensor:
    return torch.randint(3, SHAPE["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def step(model, ids) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one forward+backward."""
    cpu, wall = time.process_time(), time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    for p in model.parameters():
        p.grad = None
    return cpu, wall


# ---- child processes --------------------------------------------------------------------------------


def child_time(base_dir: Path, quant: str | None, steps: int, variants: list[str]) -> dict:
    """Alternate steps over PEFT and our variants, all in this one process; median seconds per impl."""
    models = {"peft": wrap(load(base_dir, quant), "peft").train()}
    for variant in variants:
        models[variant] = wrap(load(base_dir, quant), "ours").train()
    ids = batch()
    cpu: dict[str, list[float]] = {name: [] for name in models}
    wall: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for round_ in range(steps + 1):
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            _use_variant(name if name != "peft" else "current")
            cpu_s, wall_s = step(models[name], ids)
            if round_ > 0:  # round 0 warms up
                cpu[name].append(cpu_s)
                wall[name].append(wall_s)
    result = {name: [statistics.median(cpu[name]), statistics.median(wall[name])] for name in models}
    for name in (["current", "peft"] if steps % 2 else ["peft", "current"]):
        _use_variant(name if name != "peft" else "current")
        result[name].append(peak_step_bytes(models[name], ids))
    return result


def peak_step_bytes(model, ids) -> int:
    """Peak of live torch tensor bytes during one step, relative to its start (profiler memory events)."""
    peak, _ = peak_live_tensor_bytes(lambda: step(model, ids))
    return peak


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
    parser.add_argument("--steps", type=int, default=8, help="timed steps per implementation and round")
    parser.add_argument("--rss", action="store_true", help="also measure peak RSS growth (subprocess per impl)")
    parser.add_argument("--variants", action="store_true", help="also time older versions of our branch")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        torch.set_num_threads(1)
        mode, base_dir, quant, *rest = args.child
        quant_arg = None if quant == "none" else quant
        if mode == "time":
            result = child_time(Path(base_dir), quant_arg, int(rest[0]), rest[1].split(","))
        else:
            result = child_memory(Path(base_dir), quant_arg, rest[0], rest[1])
        print(json.dumps(result))
        return

    variants = ["current", "addmm", "scale_r", "naive"] if args.variants else ["current"]
    shape = ", ".join(f"{k}={v}" for k, v in SHAPE.items())
    print(f"# Llama-shaped {shape}; batch {BATCH}x{SEQ}; LoRA r={RANK} all-linear; "
          f"{os.cpu_count()} CPUs; time = median CPU s/step, 1 torch thread")
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = make_base(Path(tmp) / "base")
        for quant in ("none", "nf4"):
            label = "fp32 base" if quant == "none" else "nf4 base (bf16 compute)"
            times = run_child("time", str(base_dir), quant, str(args.steps), ",".join(variants))
            if args.rss:
                rss = {impl: run_child("memory", str(base_dir), quant, impl, "current")["peak_step_bytes"]
                       for impl in ("ours", "peft")}
                print(f"{label}: RSS cross-check: ours {rss['ours'] / 2**20:.1f} MiB, "
                      f"peft {rss['peft'] / 2**20:.1f} MiB (ratio {rss['ours'] / rss['peft']:.3f})")
            (ours_cpu, ours_wall, mem_ours), (peft_cpu, peft_wall, mem_peft) = times["current"], times["peft"]
            for variant in variants[1:]:
                print(f"{label}, variant {variant}: {times[variant][0] * 1e3:.1f} ms CPU/step "
                      f"(time ratio {variant}/peft: {times[variant][0] / peft_cpu:.3f})")
            print(f"{label}: ours {ours_cpu * 1e3:.1f} ms CPU ({ours_wall * 1e3:.0f} ms wall)/step, "
                  f"{mem_ours / 2**20:.1f} MiB; peft {peft_cpu * 1e3:.1f} ms CPU ({peft_wall * 1e3:.0f} ms wall)/step, "
                  f"{mem_peft / 2**20:.1f} MiB; time ratio ours/peft: {ours_cpu / peft_cpu:.3f}  "
                  f"memory ratio ours/peft: {mem_ours / mem_peft:.3f}")


if __name__ == "__main__":
    main()
