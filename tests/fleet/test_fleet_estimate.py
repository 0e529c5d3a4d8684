"""fleet.estimate's pure parts: what it cannot know it says, and the token count's rules."""

from __future__ import annotations

from fleet.estimate import DatasetTokens, RunShape, estimate_job, estimated_example_tokens
from fleet.job_spec import LoraSpec
from fleet.memory_model import BaseModelShape

TINY = BaseModelShape.from_config_json({"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4,
                                        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512})
RUN = RunShape(n_epochs=2, micro_batch_sequences=1, gradient_accumulation_steps=1, max_seq_len=64, workers=1)
TOKENS = DatasetTokens(n_examples=10, n_tokens=300, n_truncated=1)


def _estimate(lora: LoraSpec, shape: BaseModelShape | None = TINY):
    return estimate_job(model="m", base_model="m", lora=lora, quantization="nf4", shape=shape,
                        shape_unknown="unknown: no config.json", tokens=TOKENS, run=RUN, throughput=None,
                        accelerator="GPU")


def test_a_target_module_without_a_known_shape_leaves_the_model_figures_unknown_and_names_it():
    estimate = _estimate(LoraSpec(target_modules=["q_proj", "c_attn"]))
    for figure in (estimate.trainable_parameters, estimate.adapter_file_bytes, estimate.peak_memory_bytes):
        assert figure.value is None and "c_attn" in figure.assumption
    assert estimate.training_tokens.value == 600  # 300 tokens × 2 epochs: the file alone tells this one
    assert "1 cut at max_seq_len=64" in estimate.training_tokens.assumption


def test_all_linear_left_to_the_engine_counts_every_llama_linear_layer():
    named = _estimate(LoraSpec(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"]))
    assert _estimate(LoraSpec(target_modules="all-linear")).trainable_parameters == named.trainable_parameters


def test_without_a_shape_every_model_figure_carries_the_reason():
    estimate = _estimate(LoraSpec(), shape=None)
    assert estimate.peak_memory_bytes.activations.assumption == "unknown: no config.json"
    assert estimate.trainable_parameters.value is None


def test_example_tokens_count_characters_and_the_chat_templates_markers():
    chat = {"messages": [{"role": "user", "content": "a" * 8}, {"role": "assistant", "content": "b" * 9}]}
    assert estimated_example_tokens(chat) == 2 + 3 + 2 * 4 + 2  # ⌈8/4⌉ + ⌈9/4⌉, 4 a message, 2 an example
    assert estimated_example_tokens({"prompt": "x" * 4, "completion": "y"}) == 1 + 1 + 2
