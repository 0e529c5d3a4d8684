"""Turning validated dataset records into token ids and loss labels, with the base model's chat template.

Labels follow the transformers convention: `labels[t]` is the target the model predicts from the
tokens before t (the model shifts them), and -100 means "no loss here". By default only assistant
turns carry loss, each with its end-of-turn token so the model learns to stop; an assistant turn with
`"weight": 0` carries none. Prompt/completion records carry loss on the completion and EOS only.

Finding the assistant tokens works for any chat template, not only ones with `{% generation %}`
markers: the conversation is rendered once to text and tokenized once (so the ids are exactly what
the model sees at inference), and each assistant turn's character span is found by rendering the
conversation up to that turn with and without it (2 renders per assistant turn, plus the whole
conversation, which is the last turn's "with"). Tokens whose first character falls in a span are
labelled. Templates that rewrite earlier turns (e.g. dropping past reasoning) or refuse to render a
prefix fall back to locating the turn's content, and a special token right after it, in the text.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "IGNORE_INDEX",
    "ChatTemplateError",
    "TokenizedExample",
    "tokenize_dataset",
    "tokenize_example",
]

IGNORE_INDEX = -100


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot render a conversation, or renders it in a way we cannot map."""


@dataclass(frozen=True, slots=True)
class TokenizedExample:
    """One example as the model sees it. `labels[t] == IGNORE_INDEX` where no loss is taken.

    `labels[0]` is always IGNORE_INDEX: nothing inside the example predicts its first token, and
    packing must not let the previous example's last token learn to predict it.
    """

    input_ids: list[int]
    labels: list[int]
    n_tokens_untruncated: int

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def truncated(self) -> bool:
        return self.n_tokens_untruncated > len(self.input_ids)

    @property
    def n_loss_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def tokenize_example(
    record: dict[str, Any],
    tokenizer: Any,
    *,
    max_seq_len: int | None,
    train_on_inputs: bool = False,
) -> TokenizedExample:
    """Tokenize one validated record (chat `messages` or `prompt`/`completion`).

    `max_seq_len=None` keeps every token (the validator uses it to measure lengths); otherwise the
    example is cut to its first `max_seq_len` tokens. `train_on_inputs=True` puts loss on every
    token except assistant turns with weight 0, which stay excluded: the weight is the user's
    explicit per-turn instruction.
    """
    if max_seq_len is not None and max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2 (one input and one target), got {max_seq_len}")
    if "messages" in record:
        input_ids, trainable = _tokenize_chat(record["messages"], tokenizer, train_on_inputs)
    else:
        input_ids, trainable = _tokenize_prompt_completion(
            record["prompt"], record["completion"], tokenizer, train_on_inputs
        )
    labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(input_ids, trainable, strict=True)]
    if labels:
        labels[0] = IGNORE_INDEX
    n_untruncated = len(input_ids)
    if max_seq_len is not None and n_untruncated > max_seq_len:
        input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
    return TokenizedExample(input_ids=input_ids, labels=labels, n_tokens_untruncated=n_untruncated)


def tokenize_dataset(
    records: Iterable[dict[str, Any]],
    tokenizer: Any,
    *,
    max_seq_len: int | None,
    train_on_inputs: bool = False,
) -> list[TokenizedExample]:
    """Tokenize every record; see `tokenize_example`."""
    return [tokenize_example(r, tokenizer, max_seq_len=max_seq_len, train_on_inputs=train_on_inputs) for r in records]


def _tokenize_prompt_completion(
    prompt: str, completion: str, tokenizer: Any, train_on_inputs: bool
) -> tuple[list[int], list[bool]]:
    """Raw text, no chat template (as OpenAI's and Together's completion format): [BOS] prompt completion EOS.

    Prompt and completion are tokenized separately so that no token straddles the boundary and
    the loss starts exactly at the completion.
    """
    if tokenizer.eos_token_id is None:
        raise ChatTemplateError("the tokenizer has no eos_token; prompt/completion training needs one")
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    completion_ids.append(tokenizer.eos_token_id)
    return prompt_ids + completion_ids, [train_on_inputs] * len(prompt_ids) + [True] * len(completion_ids)


def _render(tokenizer: Any, conversation: list[dict[str, str]], add_generation_prompt: bool) -> str:
    if not conversation and not add_generation_prompt:
        return ""
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raises many types (TemplateError, TypeError, custom raise_exception)
        raise ChatTemplateError(f"the chat template failed to render this conversation: {e}") from e
    if not isinstance(text, str):
        raise ChatTemplateError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not str")
    return text


def _assistant_spans(tokenizer: Any, conversation: list[dict[str, str]], full_text: str) -> list[tuple[int, int, int]]:
    """Character spans (start, end, message index) of each assistant turn in `full_text`."""
    special = _special_token_strings(tokenizer)
    spans: list[tuple[int, int, int]] = []
    search_from = 0
    for i, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        try:
            before = _render(tokenizer, conversation[:i], add_generation_prompt=True)
            # The last turn's "through" is the whole conversation: the text already rendered.
            last = i == len(conversation) - 1
            through = full_text if last else _render(tokenizer, conversation[: i + 1], add_generation_prompt=False)
        except ChatTemplateError:  # some templates refuse a prefix (e.g. one that ends on an assistant turn)
            before = through = ""
        if (
            through
            and len(before) >= search_from
            and through.startswith(before)
            and full_text.startswith(through)
            and len(through) > len(before)
        ):
            start, end = len(before), _trim_after_end_of_turn(through, len(before), special)
        else:
            start, end = _locate_content(full_text, message["content"], search_from, special, i)
        spans.append((start, end, i))
        search_from = end
    return spans


def _special_token_strings(tokenizer: Any) -> list[str]:
    """Every special token's text, longest first (end-of-turn tokens such as <|eot_id|> are often
    added tokens that `all_special_tokens` does not list)."""
    found = set(getattr(tokenizer, "all_special_tokens", []))
    found.update(t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special)
    return sorted((t for t in found if t), key=len, reverse=True)


def _trim_after_end_of_turn(text: str, start: int, special: Sequence[str]) -> int:
    """End of the span `text[start:]`, without whitespace the template adds after an end-of-turn token.

    ChatML renders `content<|im_end|>\\n`; the model stops at `<|im_end|>` and never predicts the
    newline, so training on it teaches nothing (and transformers' `{% generation %}` masks agree).
    """
    stripped = text.rstrip()
    if len(stripped) > start and any(stripped.endswith(tok) for tok in special):
        return len(stripped)
    return len(text)


def _locate_content(
    full_text: str, content: str, search_from: int, special: Sequence[str], index: int
) -> tuple[int, int]:
    """Fallback for templates that are not prefix-stable: find the content, plus a special token after it."""
    for candidate in (content, content.strip()):
        pos = full_text.find(candidate, search_from) if candidate else -1
        if pos >= 0:
            end = pos + len(candidate)
            for tok in special:
                if full_text.startswith(tok, end):
                    end += len(tok)
                    break
            return pos, end
    raise ChatTemplateError(
        f"cannot find assistant message {index} in the text rendered by the chat template; "
        "the template rewrites assistant content, so loss masking cannot be derived from it"
    )


def _tokenize_chat(
    messages: list[dict[str, Any]], tokenizer: Any, train_on_inputs: bool
) -> tuple[list[int], list[bool]]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ChatTemplateError(
            "the base model's tokenizer has no chat_template; use prompt/completion records or a chat model"
        )
    conversation = [{"role": m["role"], "content": m["content"]} for m in messages]
    full_text = _render(tokenizer, conversation, add_generation_prompt=False)
    spans = _assistant_spans(tokenizer, conversation, full_text)
    try:
        encoding = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as e:  # slow (Python) tokenizers have no offsets
        raise ChatTemplateError("loss masking needs a fast tokenizer (offset mapping)") from e
    input_ids = list(encoding["input_ids"])
    offsets = encoding["offset_mapping"]
    trainable = [train_on_inputs] * len(input_ids)
    token_starts = [tok_start for tok_start, _ in offsets]  # non-decreasing
    for start, end, index in spans:
        keep = messages[index].get("weight", 1) != 0
        for t in range(bisect.bisect_left(token_starts, start), bisect.bisect_left(token_starts, end)):
            if offsets[t][1] > offsets[t][0]:
                trainable[t] = keep
    return input_ids, trainable
