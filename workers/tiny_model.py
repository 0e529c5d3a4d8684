"""A tiny Llama-architecture base model and tokenizer, generated offline for tests and the local stack.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on a short text shipped in
`workers/data/tiny_corpus.txt`, and the weights are a seeded random init. The same seed always gives
bit-identical weights, so tests can rely on it. Real users point the catalog at a real model instead.

`DEMO_SHAPE` is what `lorafleet up` serves: the same size, but an output head initialised at
std 1/√hidden instead of Llama's 0.02. LoRA leaves the head and the final norm frozen, and a
unit-RMS hidden state h gives logits W·h with |logit| ≤ ‖W_row‖·√hidden = std·hidden: 2.6 with
std 0.02 at hidden 128, which caps the probability of any token near 3% over a 512-token vocabulary
(loss ≥ ~3.5 nats whatever the adapter learns). At std 1/√hidden the cap is √hidden ≈ 11, and the
untrained model still starts near uniform (logit std 1).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

__all__ = ["DEMO_SHAPE", "TINY_CHAT_TEMPLATE", "TinyModelShape", "make_tiny_model"]

logger = logging.getLogger(__name__)

# A Llama-3-like chat template. The {% generation %} markers let transformers return an
# assistant-token mask (`return_assistant_tokens_mask=True`); they render to nothing.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] + '<|end|>' }}"
    "{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start|>assistant\n' }}{% endif %}"
)

_SPECIAL_TOKENS = ["<|pad|>", "<|begin|>", "<|end|>", "<|start|>"]


@dataclass(frozen=True)
class TinyModelShape:
    """The architecture of the generated model: small enough to train on 2 CPU cores in seconds."""

    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # GQA, as in Llama 3
    max_position_embeddings: int = 1024
    # std of the output head's init; None: Llama's initializer_range (0.02), as the test fixtures use.
    lm_head_init_std: float | None = None


# The quickstart's base model: a head the frozen base lets LoRA reach peaked predictions through.
DEMO_SHAPE = TinyModelShape(lm_head_init_std=TinyModelShape.hidden_size**-0.5)


def _corpus_text() -> str:
    return resources.files("workers").joinpath("data/tiny_corpus.txt").read_text(encoding="utf-8")


def _train_tokenizer(vocab_size: int):
    """Train a byte-level BPE on the shipped corpus and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus_text().split("\n\n"), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|begin|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|start|>"],
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def make_tiny_model(out_dir: Path | str, *, seed: int = 0, shape: TinyModelShape | None = None) -> Path:
    """Write a randomly initialised Llama model + tokenizer to `out_dir` and return the path.

    The directory loads with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`
    under `HF_HUB_OFFLINE=1`. Building twice with the same seed gives identical weights.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = shape or TinyModelShape()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_tokenizer(shape.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    # Seed the init without disturbing the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        if shape.lm_head_init_std is not None:
            torch.nn.init.normal_(model.lm_head.weight, mean=0.0, std=shape.lm_head_init_std)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "lorafleet_tiny.json").write_text(json.dumps({"seed": seed, **asdict(shape)}, indent=2) + "\n")
    logger.info("wrote tiny Llama model (seed %d, %d parameters) to %s", seed, model.num_parameters(), out)
    return out
