"""CPU time and peak memory of a packed training step: varlen attention vs the dense block-diagonal mask.

Usage: .venv/bin/python bench/attention_step.py [--seq 2048] [--rows 2] [--rounds 2]

A Llama-shaped model (4 layers, hidden 256, GQA 4/2 heads, SwiGLU 688, vocab 8192, fp32, LoRA r=16
on q,k,v,o,gate,up,down, non-reentrant gradient checkpointing, as bench/loss_memory.py) runs one
forward+backward of workers.token_loss.TokenLoss on the same packed micro-batch (`rows` rows of
`seq` tokens, examples of 32..512 tokens packed best-fit, answers carrying loss), twice per round in
ABBA order:
    dense    make_batches(block_mask="4d"): a (B, 1, T, T) additive mask built by the collator,
             transformers' sdpa attention (the KV heads repeated for GQA, every cross-example block)
    varlen   make_batches(block_mask="varlen"): cumulative segment lengths, workers.attention (on a
             CPU: one causal SDPA per segment, GQA native)
Each side's time covers collating the batch (the mask is built there) and the step. It prints each
side's peak and CPU seconds, then `peak step memory ratio varlen/dense` and `step time ratio
varlen/dense`. Memory: the peak of live torch tensor bytes above the start of collate + step, from
the torch profiler's allocation events, as bench/loss_memory.py measures it.
"""

from __future__ import annotations

import argparse
import platform
import random
import time

import torch
from tensor_memory import peak_live_tensor_bytes
from torch import nn

from workers.attention import VARLEN_ATTENTION, use_varlen_attention
from workers.packing import make_batches
from workers.token_loss import TokenLoss
from workers.tokenization import IGNORE_INDEX, TokenizedExample

VOCAB = 8192


def make_model() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_core import LoraConfig, apply_lora, prepare_for_training

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=4096,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).requires_grad_(False)
    apply_lora(model, LoraConfig(r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"]))
    return prepare_for_training(model, gradient_checkpointing=True)


def make_examples(n_tokens: int) -> list[TokenizedExample]:
    """Examples of 32..512 tokens, the first third of each a prompt without loss, totalling ~n_tokens."""
    rng = random.Random(0)
    examples, total = [], 0
    while total < n_tokens:
        n = rng.randint(32, 512)
        ids = [rng.randrange(3, VOCAB) for _ in range(n)]
        labels = [IGNORE_INDEX if t < n // 3 else i for t, i in enumerate(ids)]
        examples.append(TokenizedExample(ids, labels, n))
        total += n
    return examples


def step(model: nn.Module, loss_module: nn.Module, examples, block_mask: str, seq: int, rows: int) -> float:
    start = time.process_time()
    model.set_attn_implementation(VARLEN_ATTENTION if block_mask == "varlen" else "sdpa")
    batch = next(make_batches(examples, block_len=seq, batch_size=rows, pad_id=0, seed=0, block_mask=block_mask))
    loss_sum, _ = loss_module(batch.inputs)
    loss_sum.backward()
    for p in loss_module.parameters():
        p.grad = None
    return time.process_time() - start


def measured_step(*args) -> tuple[int, float]:
    """(peak live tensor bytes above the start, CPU seconds) of collate + step, from profiler memory events."""
    return peak_live_tensor_bytes(lambda: step(*args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)

    model = make_model()
    use_varlen_attention(model)  # registers the function; each step then picks its side's attention
    loss_module = TokenLoss(model)
    examples = make_examples(args.seq * args.rows)
    first = next(make_batches(examples, block_len=args.seq, batch_size=args.rows, pad_id=0, seed=0,
                              block_mask="varlen"))
    n_segments = len(first.inputs["cu_seq_lens_q"]) - 1
    sides = ("dense", "varlen")
    block_masks = {"dense": "4d", "varlen": "varlen"}
    for name in sides:  # warm-up: one-time allocations are not part of a step
        step(model, loss_module, examples, block_masks[name], args.seq, args.rows)
    peaks: dict[str, list[int]] = {name: [] for name in sides}
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    abba = ["dense", "varlen", "varlen", "dense"]
    for r in range(args.rounds):
        for name in abba if r % 2 == 0 else abba[::-1]:
            peak, cpu = measured_step(model, loss_module, examples, block_masks[name], args.seq, args.rows)
            peaks[name].append(peak)
            seconds[name].append(cpu)

    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread; "
          f"{args.rows}x{args.seq} tokens, {first.n_tokens} real, {first.n_examples} examples, "
          f"{n_segments} segments (padding included)")
    for name in sides:
        print(f"{name:7s} peak step memory {max(peaks[name]) / 2**20:8.1f} MiB "
              f"(min {min(peaks[name]) / 2**20:.1f})   CPU s/step {min(seconds[name]):.2f} "
              f"(max {max(seconds[name]):.2f})")
    print(f"peak step memory ratio varlen/dense: {max(peaks['varlen']) / max(peaks['dense']):.3f}")
    print(f"step time ratio varlen/dense: {min(seconds['varlen']) / min(seconds['dense']):.3f}")


if __name__ == "__main__":
    main()
