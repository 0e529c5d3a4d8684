"""Peak memory of one training step at a 128k vocabulary: the chunked token loss vs the loop's loss before it.

Usage: .venv/bin/python bench/loss_memory.py [--vocab 128256] [--rows 4] [--seq 512] [--rounds 2]

A Llama-shaped model (4 layers, hidden 256, GQA 4/2 heads, SwiGLU 688, fp32, non-reentrant gradient
checkpointing as the loop sets it up) with LoRA r=16 on q,k,v,o,gate,up,down runs one forward+backward
of the loss on a batch of `rows × seq` tokens, every position carrying loss, twice per round in ABBA
order with two loss modules over the same model:
    before   the loop's loss until this change: the output head on all N loss positions at once,
             (N × V) logits in fp32, cross-entropy and argmax over them (copied below, unchanged)
    chunked  workers.token_loss.TokenLoss: the head ~64 MiB of fp32 logits at a time, ∂ℓ/∂h taken in
             the forward pass for the frozen head
It prints each one's peak, then one line `peak step memory ratio chunked/before: X`.
Memory: the peak of live torch tensor bytes during the step above what was live before it, from the
torch profiler's allocation and free events (profile_memory=True) summed in time order, as
bench/lora_step.py measures it (tracemalloc cannot see torch's CPU tensors). CPU time per step is
printed for information (one torch thread); it is not the point of this bench.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F
from tensor_memory import peak_live_tensor_bytes
from torch import nn

from workers.token_loss import TokenLoss
from workers.tokenization import IGNORE_INDEX


class UnchunkedTokenLoss(nn.Module):
    """The loop's loss before chunking (workers/loop.py _TokenLoss at commit 0234119), for comparison."""

    def __init__(self, causal_lm: nn.Module):
        super().__init__()
        self.causal_lm = causal_lm

    def forward(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        hidden = self.causal_lm.get_decoder()(**model_inputs, use_cache=False).last_hidden_state  # (B, T, H)
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = self.causal_lm.get_output_embeddings()(hidden[:, :-1][keep]).float()  # (N, V)
        picked = targets[keep]
        loss_sum = F.cross_entropy(logits, picked, reduction="sum")
        n_correct = (logits.argmax(dim=-1) == picked).sum()
        return loss_sum, n_correct


def make_model(vocab: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_core import LoraConfig, apply_lora, prepare_for_training

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).requires_grad_(False)
    apply_lora(model, LoraConfig(r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"]))
    return prepare_for_training(model, gradient_checkpointing=True)


def step(loss_module: nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    start = time.process_time()
    loss_sum, _ = loss_module(inputs)
    loss_sum.backward()
    for p in loss_module.parameters():
        p.grad = None
    return time.process_time() - start


def peak_step_bytes(loss_module: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[int, float]:
    """(peak live tensor bytes above the start, CPU seconds) of one step, from profiler memory events."""
    return peak_live_tensor_bytes(lambda: step(loss_module, inputs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)

    model = make_model(args.vocab)
    ids = torch.randint(3, args.vocab, (args.rows, args.seq), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "labels": ids}
    n_loss = args.rows * (args.seq - 1)
    sides = {"before": UnchunkedTokenLoss(model), "chunked": TokenLoss(model)}
    for loss_module in sides.values():
        step(loss_module, inputs)  # warm-up: one-time allocations are not part of a step
    peaks: dict[str, list[int]] = {name: [] for name in sides}
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    abba = ["before", "chunked", "chunked", "before"]
    for r in range(args.rounds):
        for name in abba if r % 2 == 0 else abba[::-1]:
            peak, cpu = peak_step_bytes(sides[name], inputs)
            peaks[name].append(peak)
            seconds[name].append(cpu)

    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread; vocab {args.vocab}, "
          f"{args.rows}x{args.seq} tokens, {n_loss} loss tokens, rows per chunk {sides['chunked'].rows_per_chunk}")
    print(f"(N x V) fp32 logits alone: {n_loss * args.vocab * 4 / 2**20:.0f} MiB")
    for name in sides:
        print(f"{name:8s} peak step memory {max(peaks[name]) / 2**20:8.1f} MiB "
              f"(min {min(peaks[name]) / 2**20:.1f})   CPU s/step {min(seconds[name]):.2f}")
    ratio = max(peaks["chunked"]) / max(peaks["before"])
    print(f"peak step memory ratio chunked/before: {ratio:.3f}")


if __name__ == "__main__":
    main()
