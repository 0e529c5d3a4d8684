"""The training setups the benchmarks compare, each run for a few optimizer steps in its own process and timed.

Sides (the same model, data, LoRA and effective batch; see bench/train_throughput.py for the details):
  ours:          workers.loop.train (packed rows, logits only where loss is taken)
  ours-unpacked: the same loop with packing off, at HF's batch and accumulation
  hf:            transformers.Trainer + peft.get_peft_model, examples padded to the longest of each micro-batch
  trl:           trl.SFTTrainer + PEFT, `packing=True` with its default strategy (bfd, padding-free),
                 `assistant_only_loss=True`: the loss is on the assistant turns, as ours
  trl+liger:     the same with `use_liger_kernel=True` (CUDA only, where liger-kernel is installed)

`run_side(setup)` starts `python bench/sides.py SETUP_JSON` (or a launcher such as torchrun in front of it)
and returns the summary dict that process printed. Each side records the clock at the end of every
optimizer step: process CPU time and wall time (after `torch.cuda.synchronize()` on CUDA). The first
`warmup` steps are left out of the figures. Peak memory: on CPU the process's peak RSS (VmHWM; run with
MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave RSS), on CUDA `torch.cuda.max_memory_allocated()`.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_WORDS = "the a of to and in is it you that he was for on are with as his they be at one have this".split()
SIDES = ("ours", "ours-unpacked", "hf", "trl", "trl+liger")


@dataclass(frozen=True)
class Setup:
    """What one side runs. `batch` is rows per micro-batch: packed rows of `seq` tokens for ours and trl,
    examples for hf and ours-unpacked, which accumulate `hf_accumulation` micro-batches per step."""

    side: str
    model: str
    data: str
    seq: int
    batch: int
    steps: int
    hf_accumulation: int
    warmup: int = 1
    device: str = "cpu"  # "cpu" or "cuda"
    precision: str = "fp32"  # "fp32", "bf16" (autocast) or "nf4" (4-bit base, bf16 compute)
    gradient_checkpointing: bool = True
    lora_r: int = 16
    threads: int | None = 1  # torch threads in the side's process; None: torch's default


@dataclass
class StepClock:
    """Clock readings at the end of each optimizer step, and the tokens each step consumed."""

    cuda: bool
    cpu_s: list[float] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)

    def mark(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.cpu_s.append(time.process_time())
        self.wall_s.append(time.perf_counter())


def write_chat_data(path: Path, n: int, *, seed: int = 0, scale: float = 1.0) -> Path:
    """Chat JSONL whose lengths spread like real SFT data: many short turns, a long tail (× `scale` words)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            n_prompt = min(int(300 * scale), max(5, int(scale * rng.lognormvariate(3.4, 0.8))))  # median ~30·scale
            n_reply = min(int(200 * scale), max(3, int(scale * rng.lognormvariate(3.0, 0.9))))  # median ~20·scale
            record = {
                "messages": [
                    {"role": "user", "content": " ".join(rng.choice(_WORDS) for _ in range(n_prompt))},
                    {"role": "assistant", "content": " ".join(rng.choice(_WORDS) for _ in range(n_reply))},
                ]
            }
            f.write(json.dumps(record) + "\n")
    return path


def make_llama(out: Path, shape, *, device: str = "cpu", dtype: str = "float32") -> Path:
    """A seeded random Llama of `shape` (a workers.tiny_model.TinyModelShape) with the tiny model's tokenizer.

    The tokenizer uses the first few hundred ids only; `shape.vocab_size` sets what the output head costs.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from workers.tiny_model import make_tiny_model

    make_tiny_model(out, seed=0)  # the tokenizer and a config to start from
    config = LlamaConfig.from_pretrained(out)
    for name, value in asdict(shape).items():
        setattr(config, name, value)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out)
    return out


@dataclass(frozen=True)
class DataStats:
    """The data as our tokenizer sees it: documents' token counts after truncation, loss share, packing."""

    lengths: list[int]
    loss_share: float  # share of tokens that carry loss
    packed_rows: int  # rows of `seq` tokens best-fit packing fills

    @property
    def examples_per_row(self) -> float:
        return len(self.lengths) / self.packed_rows

    def describe(self, seq: int) -> str:
        lengths = sorted(self.lengths)
        return (f"{len(lengths)} examples, tokens per example median {lengths[len(lengths) // 2]}, max {lengths[-1]}, "
                f"mean {sum(lengths) / len(lengths):.0f}; packed into {self.packed_rows} rows of {seq}; "
                f"loss on {self.loss_share:.1%} of tokens")


def data_stats(data: Path, model: Path, seq: int) -> DataStats:
    from transformers import AutoTokenizer

    from workers.datasets import read_examples
    from workers.packing import plan_epoch
    from workers.tokenization import tokenize_dataset

    examples = tokenize_dataset(read_examples(data), AutoTokenizer.from_pretrained(model), max_seq_len=seq)
    lengths = [len(e) for e in examples]
    rows = sum(len(b) for b in plan_epoch(lengths, block_len=seq, batch_size=1, seed=0))
    return DataStats(lengths, sum(e.n_loss_tokens for e in examples) / sum(lengths), rows)


def run_side(setup: Setup, *, launcher: list[str] | None = None, env: dict[str, str] | None = None) -> dict:
    """Run one side in a fresh process; its summary (tokens/s, peak memory, ...), or SystemExit with its output."""
    cmd = [*(launcher or [sys.executable]), __file__, json.dumps(asdict(setup))]
    proc = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(proc.stdout[-3000:], proc.stderr[-5000:])
        raise SystemExit(f"{setup.side} ({setup.precision}) run failed (exit {proc.returncode}); its output is above")
    return json.loads(lines[-1].removeprefix("RESULT "))


def _summary(clock: StepClock, step_tokens: list[int], step_loss_tokens: list[int], warmup: int) -> dict:
    """Figures over the steps after `warmup` (the clock reading at the end of step `warmup` is the start)."""
    n = len(clock.wall_s)
    if n <= warmup or warmup < 1:
        raise SystemExit(f"{n} steps timed; need more than warmup={warmup} (>= 1): raise --steps")
    tokens = sum(step_tokens[warmup:n])
    loss_tokens = sum(step_loss_tokens[warmup:n]) if step_loss_tokens else None
    return {
        "tokens_per_cpu_s": tokens / (clock.cpu_s[-1] - clock.cpu_s[warmup - 1]),
        "tokens_per_wall_s": tokens / (clock.wall_s[-1] - clock.wall_s[warmup - 1]),
        "steps_timed": n - warmup,
        "tokens_per_step": tokens / (n - warmup),
        "loss_token_share": loss_tokens / tokens if loss_tokens is not None else None,
        "peak_mib": _peak_mib(clock.cuda),
    }


def _peak_mib(cuda: bool) -> float:
    if cuda:
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------------------------------------ ours
class _ClockReporter:
    """A workers.reporting.Reporter that only reads the clock and the token count at each step's metrics."""

    def __init__(self, clock: StepClock):
        self.clock, self.tokens_trained = clock, [0]

    def log(self, message: str, level: str = "info") -> None:
        pass

    def metrics(self, step: int, values: dict) -> None:
        if step == 0:  # an evaluation before training
            return
        if "tokens_trained" not in values:
            raise SystemExit(f"ours: the loop's metrics no longer carry tokens_trained (got {sorted(values)})")
        self.clock.mark()
        self.tokens_trained.append(int(values["tokens_trained"]))

    def checkpoint(self, step: int, path: Path) -> None:
        pass

    def control(self):
        return None


def _run_ours(setup: Setup, clock: StepClock) -> tuple[list[int], list[int]]:
    import torch

    from workers.loop import Runtime, train
    from workers.spec import TrainingSpec

    packed = setup.side == "ours"
    spec = TrainingSpec(
        base_model=setup.model,
        training_file=setup.data,
        max_seq_len=setup.seq,
        lora={"r": setup.lora_r, "alpha": 2 * setup.lora_r, "dropout": 0.0, "target_modules": TARGETS},
        packing=packed,
        quantization="nf4" if setup.precision == "nf4" else None,
        bf16=setup.precision != "fp32",
        hyperparameters={"n_epochs": 1, "batch_size": setup.batch, "learning_rate": 2e-4, "max_steps": setup.steps,
                         "warmup_ratio": 0.0, "gradient_accumulation_steps": 1 if packed else setup.hf_accumulation},
        n_checkpoints=0,
        gradient_checkpointing=setup.gradient_checkpointing,
    )
    reporter = _ClockReporter(clock)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    with tempfile.TemporaryDirectory() as out:
        # The clock starts at the first step's end; the setup (loading, tokenising) is not timed.
        if world_size == 1:  # alone: the loop picks CUDA when there is one
            train(spec, output_dir=Path(out), reporter=reporter)
        else:  # started by torchrun: one rank of a DDP group, one GPU each
            import torch.distributed as dist

            local_rank = int(os.environ["LOCAL_RANK"])
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl")
            runtime = Runtime(rank=dist.get_rank(), world_size=world_size, device=torch.device("cuda", local_rank))
            train(spec, output_dir=Path(out), reporter=reporter, runtime=runtime)
            dist.destroy_process_group()
    cumulative = reporter.tokens_trained
    return [b - a for a, b in zip(cumulative, cumulative[1:], strict=False)], []


# ---------------------------------------------------------------------------------------- hf, trl
def _load_base(setup: Setup):
    """The base as an informed user loads it: dense in the compute dtype, or NF4 + double quant (QLoRA)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict = {"dtype": torch.float32 if setup.precision == "fp32" else torch.bfloat16}
    if setup.precision == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    if setup.device == "cuda":
        kwargs["device_map"] = {"": 0}
        kwargs["attn_implementation"] = _cuda_attention()
    elif setup.precision == "nf4":
        kwargs["device_map"] = {"": "cpu"}
    return AutoModelForCausalLM.from_pretrained(setup.model, **kwargs)


def _cuda_attention() -> str:
    """flash_attention_2 where flash-attn is installed (what padding-free packing is made for), else sdpa."""
    import importlib.util

    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"


def _trainer_args(setup: Setup, out: str, accumulation: int) -> dict:
    """TrainingArguments fields both Trainer sides share."""
    return dict(
        output_dir=out,
        per_device_train_batch_size=setup.batch,
        gradient_accumulation_steps=accumulation,
        max_steps=setup.steps,
        learning_rate=2e-4,
        gradient_checkpointing=setup.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=setup.precision != "fp32",
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        use_cpu=setup.device == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )


def _step_callback(clock: StepClock):
    from transformers import TrainerCallback

    class _Clock(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            clock.mark()

    return _Clock()


def _peft_config(setup: Setup):
    import peft

    return peft.LoraConfig(r=setup.lora_r, lora_alpha=2 * setup.lora_r, lora_dropout=0.0, target_modules=TARGETS,
                           task_type="CAUSAL_LM")


def _per_step(counts: list[int], accumulation: int, n_steps: int) -> list[int]:
    # Trainer may fetch a step's micro-batches ahead of time: group by order, not by when they were collated.
    return [sum(counts[i * accumulation : (i + 1) * accumulation]) for i in range(n_steps)]


def _run_hf(setup: Setup, clock: StepClock) -> tuple[list[int], list[int]]:
    import peft
    import torch
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    from workers.datasets import read_examples
    from workers.tokenization import IGNORE_INDEX, tokenize_dataset

    tokenizer = AutoTokenizer.from_pretrained(setup.model)
    examples = tokenize_dataset(read_examples(Path(setup.data)), tokenizer, max_seq_len=setup.seq)
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples if len(e) >= 2]
    tokens: list[int] = []
    loss_tokens: list[int] = []

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
        tokens.append(int(attention_mask.sum()))
        loss_tokens.append(int((labels != IGNORE_INDEX).sum()))
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

    model = peft.get_peft_model(_load_base(setup), _peft_config(setup))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(**_trainer_args(setup, out, setup.hf_accumulation), remove_unused_columns=False)
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate,
                          callbacks=[_step_callback(clock)])
        trainer.train()
    n = len(clock.wall_s)
    return _per_step(tokens, setup.hf_accumulation, n), _per_step(loss_tokens, setup.hf_accumulation, n)


def _run_trl(setup: Setup, clock: StepClock) -> tuple[list[int], list[int]]:
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    records = [json.loads(line) for line in Path(setup.data).read_text().splitlines() if line.strip()]
    tokens: list[int] = []
    loss_tokens: list[int] = []

    def counting(collate):
        def wrapped(rows):
            batch = collate(rows)
            mask = batch.get("attention_mask")
            tokens.append(int(mask.sum()) if mask is not None else batch["input_ids"].numel())
            loss_tokens.append(int((batch["labels"] != -100).sum()))
            return batch

        return wrapped

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            **_trainer_args(setup, out, 1),
            max_length=setup.seq,
            packing=True,  # default packing_strategy "bfd", which turns padding_free on
            assistant_only_loss=True,
            use_liger_kernel=setup.side == "trl+liger",
        )
        trainer = SFTTrainer(
            model=_load_base(setup),
            args=config,
            train_dataset=datasets.Dataset.from_list(records),
            processing_class=AutoTokenizer.from_pretrained(setup.model),
            peft_config=_peft_config(setup),
            callbacks=[_step_callback(clock)],
        )
        # Padding-free refuses a custom collator; count what its own collator hands the model.
        trainer.data_collator = counting(trainer.data_collator)
        trainer.train()
    n = len(clock.wall_s)
    return _per_step(tokens, 1, n), _per_step(loss_tokens, 1, n)


def _main(setup: Setup) -> None:
    import torch

    if setup.threads is not None:
        torch.set_num_threads(setup.threads)
    torch.manual_seed(0)
    clock = StepClock(cuda=setup.device == "cuda")
    if setup.side.startswith("ours"):
        step_tokens, step_loss_tokens = _run_ours(setup, clock)
    elif setup.side == "hf":
        step_tokens, step_loss_tokens = _run_hf(setup, clock)
    else:
        step_tokens, step_loss_tokens = _run_trl(setup, clock)
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps(_summary(clock, step_tokens, step_loss_tokens, setup.warmup)))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `workers`
    _main(Setup(**json.loads(sys.argv[1])))
