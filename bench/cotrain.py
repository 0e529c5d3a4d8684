"""Co-training 4 jobs on one base vs the same 4 jobs as concurrent processes vs one after another.

Usage: .venv/bin/python bench/cotrain.py [--steps 6] [--seq 256] [--batch 2] [--hidden 512] [--layers 6]
                                         [--device cpu|cuda] [--threads 1] [--group-threads N]
                                         [--quantization none|nf4]

The 4 jobs are 4 tenants' fine-tunes of one base: LoRA ranks 8, 16, 16, 32 (alpha 2r) on every attention
and MLP projection, each on its own chat data (bench/sides.py write_chat_data, different seeds), the same
--batch packed rows of --seq tokens per step and --steps steps each, so that they run about as long.
Base: a generated Llama (bench/sides.py make_llama), by default hidden 512, 6 layers, 8 heads / 4 KV,
SwiGLU 1376, vocab 32 000 (the base's matmuls dominate the step, as in a real model), fp32 on CPU,
bf16 (autocast) on CUDA; --quantization nf4 loads it in NF4, the catalog's default (bitsandbytes
dequantizes a weight at each use, forward and backward: once for the group's tokens, not per job). Three sides,
each in fresh processes of --threads torch threads (default 1: on a loaded machine a second thread
mostly spins waiting for the first, which inflates both clocks; --group-threads gives the co-trained
process its own count, e.g. the machine's cores, which the 4 concurrent processes share):
  cotrained   one process: workers.cotrain.train_group over the 4 jobs (one copy of the base)
  concurrent  4 processes at once, workers.loop.train one job each; they wait for each other at the end
              of their first step (a file barrier), so the timed steps overlap
  sequential  4 processes one after another, workers.loop.train one job each
Figures, over every job's steps after its first (the clock starts when a job's first step ends):
  tokens/s        real tokens trained by all jobs / wall-clock seconds from the first timed step's start
                  to the last one's end (sequential: the sum of the 4 runs' timed spans)
  tokens/CPU-s    the same tokens / the CPU seconds the processes spent over those spans (process_time)
                  — on a shared machine the steadier figure: it does not move with the other load
  peak memory     CPU: the sum over the side's processes that run at the same time of each one's peak
                  RSS (VmHWM, with MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave RSS), also shown
                  above each process's RSS once torch is imported (the runtime every process pays);
                  CUDA: the sum of the processes' torch.cuda.max_memory_allocated(). Sequential: the max.
Prints one line per side and `cotrained/concurrent: tokens/s X, tokens/CPU-s Y, peak memory Z`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sides import TARGETS, make_llama, write_chat_data  # noqa: E402

RANKS = (8, 16, 16, 32)
_BARRIER_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class Job:
    """One tenant's job as the bench trains it."""

    name: str
    rank: int
    seed: int
    data: str


@dataclass(frozen=True)
class Child:
    """What one bench process runs: `jobs` co-trained (one process) or one job alone (len(jobs) == 1)."""

    mode: str  # "group" or "alone"
    model: str
    jobs: list[Job]
    seq: int
    batch: int
    steps: int
    device: str
    threads: int
    quantization: str | None = None  # the base's: None (dense) or "nf4"
    barrier_dir: str | None = None  # alone, concurrent: wait here for `barrier_count` processes
    barrier_count: int = 0


# ------------------------------------------------------------------------------------- child process


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class _Clock:
    """A Reporter that reads the clocks and the token count at each step's metrics (and holds the barrier)."""

    def __init__(self, barrier_dir: str | None, barrier_count: int, cuda: bool):
        self.barrier_dir, self.barrier_count, self.cuda = barrier_dir, barrier_count, cuda
        self.marks: list[tuple[float, float, int]] = []  # (wall s, process CPU s, tokens_trained)

    def log(self, message: str, level: str = "info") -> None:
        pass

    def checkpoint(self, step: int, path: Path) -> None:
        pass

    def control(self):
        return None

    def metrics(self, step: int, values: dict) -> None:
        if step == 0:
            return
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        if not self.marks and self.barrier_dir is not None:
            self._wait_for_the_others()
        self.marks.append((time.perf_counter(), time.process_time(), int(values["tokens_trained"])))

    def _wait_for_the_others(self) -> None:
        barrier = Path(self.barrier_dir)
        (barrier / str(os.getpid())).touch()
        deadline = time.monotonic() + _BARRIER_TIMEOUT_S
        while len(list(barrier.iterdir())) < self.barrier_count:
            if time.monotonic() > deadline:
                raise SystemExit(f"waited {_BARRIER_TIMEOUT_S:.0f} s for {self.barrier_count} processes at {barrier}")
            time.sleep(0.01)


def _spec(child: Child, job: Job):
    from workers.spec import TrainingSpec

    return TrainingSpec(
        base_model=child.model, training_file=job.data, max_seq_len=child.seq, seed=job.seed,
        lora={"r": job.rank, "alpha": 2 * job.rank, "dropout": 0.0, "target_modules": TARGETS},
        hyperparameters={"n_epochs": 1, "batch_size": child.batch, "learning_rate": 2e-4, "max_steps": child.steps,
                         "warmup_ratio": 0.0},
        n_checkpoints=0, bf16=child.device == "cuda", quantization=child.quantization,
    )


def _child_main(child: Child) -> None:
    import torch

    from workers.cotrain import GroupMember, train_group
    from workers.loop import Runtime, train

    torch.set_num_threads(child.threads)
    baseline_mib = _rss_mib("VmRSS")  # torch and the libraries loaded, nothing of the run yet
    cuda = child.device == "cuda"
    clocks = {job.name: _Clock(child.barrier_dir, child.barrier_count, cuda) for job in child.jobs}
    # Metrics at the end of every step, from the training thread (CUDA's defaults batch them every 10
    # steps on a background thread): the clock reads each step's end, at one host sync per step on each side.
    runtime = Runtime(log_every_steps=1, report_in_background=False)
    with tempfile.TemporaryDirectory() as out:
        if child.mode == "group":
            members = [GroupMember(job.name, _spec(child, job), Path(out) / job.name, clocks[job.name])
                       for job in child.jobs]
            outcomes = train_group(members, runtime=runtime)
            failed = {k: v for k, v in outcomes.items() if isinstance(v, BaseException)}
            if failed:
                raise SystemExit(f"co-trained jobs failed: {failed}")
        else:
            (job,) = child.jobs
            train(_spec(child, job), output_dir=Path(out) / job.name, reporter=clocks[job.name], runtime=runtime)
    marks = [c.marks for c in clocks.values()]
    if any(len(m) < 2 for m in marks):
        raise SystemExit("each job needs at least 2 steps: the first one is not timed")
    print("RESULT " + json.dumps({
        "start_wall": min(m[0][0] for m in marks), "end_wall": max(m[-1][0] for m in marks),
        "cpu_s": max(m[-1][1] for m in marks) - min(m[0][1] for m in marks),
        "tokens": sum(m[-1][2] - m[0][2] for m in marks),
        "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mib("VmHWM"),
        "baseline_mib": 0.0 if cuda else baseline_mib,
    }), flush=True)


# ---------------------------------------------------------------------------------------- the sides


def _start(child: Child) -> subprocess.Popen:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(child.threads)}
    return subprocess.Popen([sys.executable, __file__, "--child", json.dumps(asdict(child))], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen, what: str) -> dict:
    try:
        stdout, stderr = proc.communicate(timeout=_BARRIER_TIMEOUT_S * 2)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise SystemExit(f"{what} did not finish within {_BARRIER_TIMEOUT_S * 2:.0f} s") from None
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(stdout[-3000:], stderr[-5000:])
        raise SystemExit(f"{what} failed (exit {proc.returncode}); its output is above")
    return json.loads(lines[-1].removeprefix("RESULT "))


def run_sides(model: Path, jobs: list[Job], *, seq: int, batch: int, steps: int, device: str, threads: int,
              quantization: str | None = None, group_threads: int | None = None,
              sides: tuple[str, ...] = ("cotrained", "concurrent", "sequential")) -> dict[str, dict]:
    """Each side's figures: tokens_per_s, tokens_per_cpu_s, peak_mib, runtime_mib (the part above the baseline)."""
    common = dict(model=str(model), seq=seq, batch=batch, steps=steps, device=device, threads=threads,
                  quantization=quantization)
    figures = {}
    for side in sides:
        if side == "cotrained":
            group = {**common, "threads": group_threads or threads}
            runs = [_result(_start(Child(mode="group", jobs=jobs, **group)), "the co-trained group")]
            span = runs[0]["end_wall"] - runs[0]["start_wall"]
            peak = runs[0]["peak_mib"]
            above = peak - runs[0]["baseline_mib"]
        elif side == "concurrent":
            with tempfile.TemporaryDirectory() as barrier:
                procs = [_start(Child(mode="alone", jobs=[job], barrier_dir=barrier, barrier_count=len(jobs), **common))
                         for job in jobs]
                runs = [_result(p, f"job {job.name} (concurrent)") for p, job in zip(procs, jobs, strict=True)]
            span = max(r["end_wall"] for r in runs) - min(r["start_wall"] for r in runs)
            peak = sum(r["peak_mib"] for r in runs)
            above = sum(r["peak_mib"] - r["baseline_mib"] for r in runs)
        else:
            runs = [_result(_start(Child(mode="alone", jobs=[job], **common)), f"job {job.name} (sequential)")
                    for job in jobs]
            span = sum(r["end_wall"] - r["start_wall"] for r in runs)
            peak = max(r["peak_mib"] for r in runs)
            above = max(r["peak_mib"] - r["baseline_mib"] for r in runs)
        tokens = sum(r["tokens"] for r in runs)
        figures[side] = {"tokens_per_s": tokens / span, "tokens_per_cpu_s": tokens / sum(r["cpu_s"] for r in runs),
                         "peak_mib": peak, "runtime_mib": above, "tokens": tokens}
    return figures


def report(figures: dict[str, dict], *, cuda: bool) -> None:
    """Print the sides side by side, then the co-trained side's ratios to the others."""
    for side, f in figures.items():
        memory = (f"peak memory {f['peak_mib']:7.0f} MiB" if cuda else
                  f"peak RSS {f['peak_mib']:7.0f} MiB ({f['runtime_mib']:6.0f} MiB above the torch runtime)")
        print(f"{side:>11}: {f['tokens_per_s']:8.0f} tokens/s  {f['tokens_per_cpu_s']:8.0f} tokens/CPU-s  "
              f"{f['tokens']:7d} tokens timed  {memory}", flush=True)
    ours = figures.get("cotrained")
    for other in ("concurrent", "sequential"):
        if ours and other in figures:
            theirs = figures[other]
            above = "" if cuda else f" ({ours['runtime_mib'] / theirs['runtime_mib']:.2f} above the runtime)"
            print(f"cotrained/{other}: tokens/s {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}, "
                  f"tokens/CPU-s {ours['tokens_per_cpu_s'] / theirs['tokens_per_cpu_s']:.2f}, "
                  f"peak memory {ours['peak_mib'] / theirs['peak_mib']:.2f}{above}")


def write_jobs(directory: Path, *, scale: float = 1.0, n_examples: int = 400) -> list[Job]:
    """The 4 tenants' jobs: ranks 8/16/16/32, each with its own chat data."""
    directory.mkdir(parents=True, exist_ok=True)
    return [Job(name=f"tenant-{i}", rank=rank, seed=i,
                data=str(write_chat_data(directory / f"tenant-{i}.jsonl", n_examples, seed=10 + i, scale=scale)))
            for i, rank in enumerate(RANKS)]


def main(argv: list[str] | None = None) -> None:
    from workers.tiny_model import TinyModelShape

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per job, the first one not timed")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2, help="packed rows per job per step")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every process")
    parser.add_argument("--group-threads", type=int, help="torch threads of the co-trained process (default --threads)")
    parser.add_argument("--quantization", choices=["none", "nf4"], default="none",
                        help="the base's: dense (fp32 on CPU, bf16 on CUDA) or NF4 (bitsandbytes), as jobs load it")
    parser.add_argument("--sides", nargs="+", choices=["cotrained", "concurrent", "sequential"],
                        default=["cotrained", "concurrent", "sequential"])
    args = parser.parse_args(argv)
    if args.child:
        data = json.loads(args.child)
        _child_main(Child(**{**data, "jobs": [Job(**j) for j in data["jobs"]]}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        heads = max(1, args.hidden // 64)
        shape = TinyModelShape(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 43 // 16,
                               num_hidden_layers=args.layers, num_attention_heads=heads,
                               num_key_value_heads=max(1, heads // 2), max_position_embeddings=max(2048, args.seq))
        model = make_llama(Path(tmp) / "model", shape, dtype="float32" if args.device == "cpu" else "bfloat16")
        jobs = write_jobs(Path(tmp))
        print(f"base: hidden {args.hidden}, {args.layers} layers, {heads} heads, vocab {args.vocab}; 4 jobs, LoRA r "
              f"{'/'.join(map(str, RANKS))} on {len(TARGETS)} projections, {args.batch} rows of {args.seq} tokens "
              f"per job per step, {args.steps} steps; {args.device}, {args.threads} torch thread(s) per process "
              f"({args.group_threads or args.threads} co-trained), "
              f"base {'NF4' if args.quantization == 'nf4' else 'dense'}")
        figures = run_sides(model, jobs, seq=args.seq, batch=args.batch, steps=args.steps, device=args.device,
                            threads=args.threads, quantization=None if args.quantization == "none" else "nf4",
                            group_threads=args.group_threads,
                            sides=tuple(args.sides))
        report(figures, cuda=args.device == "cuda")


if __name__ == "__main__":
    main()
