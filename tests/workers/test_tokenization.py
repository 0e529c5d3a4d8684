"""Tokenization with the chat template: loss only where the user asked for it, checked on token ids."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from workers.tokenization import IGNORE_INDEX, ChatTemplateError, tokenize_dataset, tokenize_example

CONVERSATION = [
    {"role": "system", "content": "Answer in capitals."},
    {"role": "user", "content": "the cat sat"},
    {"role": "assistant", "content": "THE CAT SAT"},
    {"role": "user", "content": "on the mat"},
    {"role": "assistant", "content": "ignore me", "weight": 0},
    {"role": "user", "content": "again"},
    {"role": "assistant", "content": "ON THE MAT\n", "weight": 1},
]

# Our own renderings of the two most common template families, to check the span finder beyond the tiny
# model's template: Llama-3 headers (content trimmed, no newline after <|eot_id|>) and ChatML (Qwen).
LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_STYLE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Renders the final assistant turn differently from earlier ones, as templates that drop past reasoning
# do: rendering a prefix is then not a prefix of the full text, and the fallback must find the turns.
NOT_PREFIX_STABLE = (
    "{% for m in messages %}{% if loop.last and m['role'] == 'assistant' %}[final]{% endif %}"
    "<|start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)

# Refuses to render a generation prompt at all: the prefix renders fail, so the fallback must take over.
NO_GENERATION_PROMPT = (
    "{% if add_generation_prompt %}{{ raise_exception('this template has no generation prompt') }}{% endif %}"
    "{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endfor %}"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _with_template(tiny_model_dir, template: str):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_tokens(
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"],
        special_tokens=True,
    )
    tok.chat_template = template
    return tok


def _loss_text(tok, example) -> str:
    return tok.decode([i for i, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX])


def test_labels_match_transformers_assistant_mask_on_a_generation_marked_template(tokenizer):
    plain = [{"role": m["role"], "content": m["content"]} for m in CONVERSATION]
    reference = tokenizer.apply_chat_template(plain, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    example = tokenize_example({"messages": CONVERSATION}, tokenizer, max_seq_len=None)
    assert example.input_ids == list(reference["input_ids"])
    expected = list(reference["assistant_masks"])
    # the weight-0 turn is the one place we differ from transformers' mask: it must carry no loss
    weight0 = tokenizer.apply_chat_template(plain[:4], tokenize=False, add_generation_prompt=True)
    start = len(tokenizer(weight0, add_special_tokens=False)["input_ids"])
    n_weight0 = len(tokenizer("ignore me<|end|>", add_special_tokens=False)["input_ids"])
    assert expected[start : start + n_weight0] == [1] * n_weight0
    expected[start : start + n_weight0] = [0] * n_weight0
    assert [int(label != IGNORE_INDEX) for label in example.labels] == expected
    for token, label in zip(example.input_ids, example.labels, strict=True):
        assert label in (IGNORE_INDEX, token)


def test_only_weighted_assistant_turns_and_their_end_token_carry_loss(tokenizer):
    example = tokenize_example({"messages": CONVERSATION}, tokenizer, max_seq_len=None)
    assert _loss_text(tokenizer, example) == "THE CAT SAT<|end|>ON THE MAT\n<|end|>"


@pytest.mark.parametrize(
    "template, turn_end",
    [
        (LLAMA3_STYLE, "<|eot_id|>"),
        (CHATML_STYLE, "<|im_end|>"),
        (NOT_PREFIX_STABLE, "<|end|>"),
        (NO_GENERATION_PROMPT, "<|end|>"),
    ],
)
def test_assistant_spans_are_found_in_other_template_families(tiny_model_dir, template, turn_end):
    tok = _with_template(tiny_model_dir, template)
    example = tokenize_example({"messages": CONVERSATION}, tok, max_seq_len=None)
    rendered = tok.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in CONVERSATION], tokenize=False
    )
    assert example.input_ids == tok(rendered, add_special_tokens=False)["input_ids"]
    last = "ON THE MAT" if template == LLAMA3_STYLE else "ON THE MAT\n"  # the Llama-3 template trims
    assert _loss_text(tok, example) == f"THE CAT SAT{turn_end}{last}{turn_end}"


def test_train_on_inputs_trains_on_everything_except_weight_zero_turns(tokenizer):
    example = tokenize_example({"messages": CONVERSATION}, tokenizer, max_seq_len=None, train_on_inputs=True)
    dropped = [tok for tok, label in zip(example.input_ids, example.labels, strict=True) if label == IGNORE_INDEX]
    assert tokenizer.decode(dropped) == "<|begin|>ignore me<|end|>"  # the first token is never a target


def test_prompt_completion_trains_on_the_completion_and_eos(tokenizer):
    example = tokenize_example({"prompt": "reverse: a b c", "completion": " c b a"}, tokenizer, max_seq_len=None)
    assert _loss_text(tokenizer, example) == " c b a<|end|>"
    assert example.input_ids[-1] == tokenizer.eos_token_id
    everything = tokenize_example(
        {"prompt": "reverse: a b c", "completion": " c b a"},
        tokenizer,
        max_seq_len=None,
        train_on_inputs=True,
    )
    assert everything.n_loss_tokens == len(everything.input_ids) - 1


def test_truncation_keeps_the_first_tokens_and_reports_the_original_length(tokenizer):
    full = tokenize_example({"messages": CONVERSATION}, tokenizer, max_seq_len=None)
    cut = tokenize_example({"messages": CONVERSATION}, tokenizer, max_seq_len=20)
    assert cut.input_ids == full.input_ids[:20] and cut.labels == full.labels[:20]
    assert cut.truncated and not full.truncated
    assert cut.n_tokens_untruncated == len(full.input_ids)
    assert tokenize_dataset([{"messages": CONVERSATION}] * 2, tokenizer, max_seq_len=20) == [cut, cut]


def test_a_tokenizer_without_chat_template_is_a_clear_error(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat_template"):
        tokenize_example({"messages": CONVERSATION}, tok, max_seq_len=None)


def test_a_template_that_refuses_the_conversation_is_a_clear_error(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        tokenize_example({"messages": CONVERSATION}, tok, max_seq_len=None)


def test_a_conversation_ending_on_an_assistant_turn_is_rendered_two_times_per_turn(tokenizer, monkeypatch):
    import workers.tokenization as tokenization

    rendered = []
    real_render = tokenization._render

    def counting_render(*args, **kwargs):
        rendered.append(args[1])
        return real_render(*args, **kwargs)

    expected = tokenize_example({"messages": CONVERSATION}, tokenizer, max_seq_len=None)
    monkeypatch.setattr(tokenization, "_render", counting_render)
    assert tokenize_example({"messages": CONVERSATION}, tokenizer, max_seq_len=None) == expected
    n_assistant = sum(m["role"] == "assistant" for m in CONVERSATION)
    assert len(rendered) == 2 * n_assistant  # the whole text once, and the last turn reuses it
