"""JSONL training files: a validator reporting every problem with its line, and the reader of valid files.

Two formats, one per file: OpenAI's chat format `{"messages": [{"role", "content", "weight"?}]}`
(roles system/user/assistant; `weight` 0 or 1, on assistant messages only) and
`{"prompt", "completion"}`. Error codes are OpenAI's where it has one (data_type,
missing_messages_list, message_missing_key, message_unrecognized_key, unrecognized_role,
missing_content, example_missing_assistant_message); the rest are listed in `ISSUE_CODES`
(in `workers.dataset_report`, with the report types; re-exported here).

The file is read once, as bytes, one line at a time, so memory stays bounded by `max_line_bytes`
(default `MAX_LINE_BYTES`, 1 MiB) whatever the file size; a longer line is skipped through in chunks
and reported, not loaded. A line nested deeper than `MAX_JSON_DEPTH` arrays/objects is reported as
invalid JSON without being parsed (`fleet.bounded_json`): deep nesting would otherwise blow Python's
recursion limit inside `json.loads`.
Blank lines are errors, as in the JSON Lines spec, Together's file check (it JSON-parses every
line) and OpenAI's upload check ("every line is a JSON dictionary"): a blank line usually means a
record was split by a broken export, and a file we accept should be one those services accept too.
One final newline, CRLF line ends and a UTF-8 BOM are fine.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from fleet.bounded_json import MAX_JSON_DEPTH, JsonTooDeep, loads_bounded
from workers.dataset_report import (
    ISSUE_CODES,
    DatasetIssue,
    DatasetReport,
    Format,
    IssueCollector,
    Overflow,
    TokenStats,
)
from workers.tokenization import ChatTemplateError, TokenizedExample, tokenize_example

__all__ = [
    "ISSUE_CODES",
    "MAX_JSON_DEPTH",
    "MAX_LINE_BYTES",
    "DatasetFormatError",
    "DatasetIssue",
    "DatasetReport",
    "TokenStats",
    "read_examples",
    "validate_dataset",
]

ROLES = ("system", "user", "assistant")
_MESSAGE_KEYS = ("role", "content", "weight")
_BOM = b"\xef\xbb\xbf"
MAX_LINE_BYTES = 1 << 20


class DatasetFormatError(ValueError):
    """A dataset file that is not valid; `issues` lists what is wrong and where."""

    def __init__(self, path: Path | str, issues: list[DatasetIssue]) -> None:
        self.path = str(path)
        self.issues = issues
        listed = "; ".join(str(i) for i in issues[:5])
        super().__init__(f"{self.path} is not a valid dataset: {listed}")


# ------------------------------------------------------------------------------------------ reading lines
@dataclass(frozen=True)
class _RawLine:
    number: int  # 1-based
    data: bytes | None  # without the line break; None when longer than the cap
    n_bytes: int  # without the line break


def _raw_lines(f: BinaryIO, max_line_bytes: int) -> Iterator[_RawLine]:
    """Lines as bytes; a line over `max_line_bytes` is read through in bounded chunks, never held whole."""
    number = 0
    while True:
        chunk = f.readline(max_line_bytes + 2)  # room for the content and "\r\n"
        if not chunk:
            return
        number += 1
        if not chunk.endswith(b"\n") and len(chunk) == max_line_bytes + 2:
            n_bytes = len(chunk)
            del chunk
            while True:
                more = f.readline(1 << 16)
                n_bytes += len(more)
                if not more or more.endswith(b"\n"):
                    break
            yield _RawLine(number, None, n_bytes - (1 if more.endswith(b"\n") else 0))
            continue
        data = chunk.rstrip(b"\n")
        if data.endswith(b"\r"):
            data = data[:-1]
        if number == 1 and data.startswith(_BOM):
            data = data[len(_BOM) :]
        yield _RawLine(number, data, len(data))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_line(raw: _RawLine, max_line_bytes: int) -> tuple[Any, tuple[str, str] | None]:
    """The JSON value of a line, or (code, message) saying why there is none."""
    if raw.data is None or raw.n_bytes > max_line_bytes:
        return None, (
            "line_too_long",
            f"line is {raw.n_bytes} bytes, over the limit of {max_line_bytes}; split or shorten the example",
        )
    if not raw.data.strip():
        return None, ("blank_line", "empty line; every line must hold one JSON object (remove blank lines)")
    try:
        text = raw.data.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, (
            "invalid_utf8",
            f"byte {e.start + 1} of the line (0x{raw.data[e.start]:02x}) is not valid UTF-8; save the file as UTF-8",
        )
    try:
        return loads_bounded(text, parse_constant=_reject_constant), None
    except JsonTooDeep as e:
        return None, ("invalid_json", f"not accepted: {e}")
    except ValueError as e:  # JSONDecodeError is a ValueError, as is the NaN/Infinity rejection
        where = f" at column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
        return None, ("invalid_json", f"not valid JSON{where}: {msg}")


# -------------------------------------------------------------------------------------- checking records
def _check_chat(obj: dict[str, Any]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    extra = sorted(k for k in obj if k != "messages")
    if extra:
        problems.append(("example_unrecognized_key", f"unsupported top-level keys {extra}; only 'messages'"))
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        return [*problems, ("missing_messages_list", "'messages' must be a non-empty list of messages")]
    has_assistant = False
    for j, message in enumerate(messages):
        where = f"messages[{j}]"
        if not isinstance(message, dict):
            problems.append(("data_type", f"{where} must be an object, got {type(message).__name__}"))
            continue
        missing = [k for k in ("role", "content") if k not in message]
        if missing:
            problems.append(("message_missing_key", f"{where} has no {' or '.join(map(repr, missing))}"))
        unknown = sorted(k for k in message if k not in _MESSAGE_KEYS)
        if unknown:
            problems.append(
                (
                    "message_unrecognized_key",
                    f"{where} has unsupported keys {unknown}; allowed: role, content, weight",
                )
            )
        role = message.get("role")
        if "role" in message and role not in ROLES:
            problems.append(("unrecognized_role", f"{where} has role {role!r}; use one of {', '.join(ROLES)}"))
        content = message.get("content")
        if "content" in message and (not isinstance(content, str) or not content):
            problems.append(("missing_content", f"{where} content must be a non-empty string"))
        if "weight" in message:
            weight = message["weight"]
            if role != "assistant":
                problems.append(("invalid_weight", f"{where}: weight is only allowed on assistant messages"))
            elif isinstance(weight, bool) or weight not in (0, 1):
                problems.append(("invalid_weight", f"{where}: weight must be 0 or 1, got {json.dumps(weight)}"))
        has_assistant = has_assistant or role == "assistant"
    if not has_assistant:
        problems.append(("example_missing_assistant_message", "the conversation has no assistant message to learn"))
    return problems


def _check_prompt_completion(obj: dict[str, Any]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    extra = sorted(k for k in obj if k not in ("prompt", "completion"))
    if extra:
        problems.append(
            (
                "example_unrecognized_key",
                f"unsupported top-level keys {extra}; only 'prompt' and 'completion'",
            )
        )
    if "prompt" not in obj:
        problems.append(("missing_prompt", "no 'prompt' (use \"\" for none)"))
    elif not isinstance(obj["prompt"], str):
        problems.append(("invalid_prompt", f"'prompt' must be a string, got {type(obj['prompt']).__name__}"))
    if "completion" not in obj:
        problems.append(("missing_completion", "no 'completion'"))
    elif not isinstance(obj["completion"], str) or not obj["completion"]:
        problems.append(("invalid_completion", "'completion' must be a non-empty string"))
    return problems


def _check_record(obj: Any) -> tuple[Format | None, list[tuple[str, str]]]:
    """The record's format and every problem with it (OpenAI's checks, in OpenAI's order)."""
    if not isinstance(obj, dict):
        return None, [("data_type", f"each line must be a JSON object, got {type(obj).__name__}")]
    if "messages" in obj:
        return "chat", _check_chat(obj)
    if "prompt" in obj or "completion" in obj:
        return "prompt_completion", _check_prompt_completion(obj)
    keys = sorted(obj)
    return None, [
        (
            "missing_messages_list",
            f"expected a 'messages' list (chat) or 'prompt' and 'completion'; got keys {keys}",
        )
    ]


def _normalised(obj: dict[str, Any], fmt: Format) -> dict[str, Any]:
    if fmt == "prompt_completion":
        return {"prompt": obj["prompt"], "completion": obj["completion"]}
    return {"messages": [{k: m[k] for k in _MESSAGE_KEYS if k in m} for m in obj["messages"]]}


def _records(path: Path, max_line_bytes: int, collect: IssueCollector) -> Iterator[tuple[int, Format, dict[str, Any]]]:
    """Valid records with their line numbers; every problem goes to `collect`. Drives both entry points."""
    file_format: Format | None = None
    with path.open("rb") as f:
        for raw in _raw_lines(f, max_line_bytes):
            collect.n_lines = raw.number
            obj, parse_problem = _parse_line(raw, max_line_bytes)
            if parse_problem is not None:
                collect.error(raw.number, *parse_problem)
                collect.n_records += parse_problem[0] != "blank_line"
                continue
            collect.n_records += 1
            fmt, problems = _check_record(obj)
            if fmt is not None and file_format is None:
                file_format = fmt
            elif fmt is not None and fmt != file_format:
                problems.insert(0, ("mixed_formats", f"a {fmt} example in a {file_format} file; use one format"))
            for code, message in problems:
                collect.error(raw.number, code, message)
            if not problems and fmt is not None:
                yield raw.number, fmt, _normalised(obj, fmt)


def _all_weights_zero(messages: list[dict[str, Any]]) -> bool:
    return all(m.get("weight", 1) == 0 for m in messages if m["role"] == "assistant")


# --------------------------------------------------------------------------------------------- the API
def validate_dataset(
    path: Path | str,
    *,
    tokenizer: Any = None,
    max_seq_len: int | None = None,
    overflow: Overflow = "truncate",
    train_on_inputs: bool = False,
    min_examples: int = 10,
    max_line_bytes: int = MAX_LINE_BYTES,
    max_issues: int = 100,
    examples_out: list[TokenizedExample] | None = None,
) -> DatasetReport:
    """Read a JSONL dataset once and report every problem with its line number, plus counts.

    With a tokenizer, each valid example is rendered with its chat template and tokenized: token
    statistics, template errors, and examples longer than `max_seq_len` (a warning each with
    overflow="truncate", an error each with "reject"). `min_examples` defaults to OpenAI's minimum
    of 10. Only the first `max_issues` errors and warnings are listed, all are counted.
    `examples_out`, with a tokenizer, receives every example kept, in file order: when the report is
    ok, exactly what `tokenize_dataset(read_examples(path), ...)` returns, so the check's tokenization
    can be stored (`workers.pretokenized`) instead of done again.
    """
    if overflow not in ("truncate", "reject"):
        raise ValueError(f"overflow must be 'truncate' or 'reject', got {overflow!r}")
    path = Path(path)
    n_bytes = path.stat().st_size
    collect = IssueCollector(max_issues)
    file_format: Format | None = None
    n_examples = n_too_long = total_loss_tokens = 0
    lengths = array("q")
    for line, fmt, record in _records(path, max_line_bytes, collect):
        file_format = file_format or fmt
        if fmt == "chat" and not train_on_inputs and _all_weights_zero(record["messages"]):
            collect.warning(line, "no_trainable_tokens", "every assistant message has weight 0; nothing to learn")
        if tokenizer is None:
            n_examples += 1
            continue
        try:
            example = tokenize_example(record, tokenizer, max_seq_len=max_seq_len, train_on_inputs=train_on_inputs)
        except ChatTemplateError as e:
            collect.error(line, "chat_template_error", str(e))
            continue
        lengths.append(example.n_tokens_untruncated)
        if example.truncated:
            n_too_long += 1
            message = f"{example.n_tokens_untruncated} tokens, over max_seq_len={max_seq_len}"
            if overflow == "reject":
                collect.error(line, "too_long", message + "; shorten it or raise max_seq_len")
                continue
            collect.warning(line, "too_long", message + f"; only the first {max_seq_len} are trained on")
            if example.n_loss_tokens == 0:
                collect.warning(line, "no_trainable_tokens", "truncation removes every trained token")
        total_loss_tokens += example.n_loss_tokens
        n_examples += 1
        if examples_out is not None:
            examples_out.append(example)
    if collect.n_records == 0:
        collect.error(None, "empty_file", "the file holds no examples; upload one JSON object per line")
    elif collect.n_records < min_examples:
        collect.error(None, "too_few_examples", f"{collect.n_records} examples; at least {min_examples} are required")
    n_errors, n_warnings = sum(collect.error_counts.values()), sum(collect.warning_counts.values())
    return DatasetReport(
        ok=n_errors == 0,
        format=file_format,
        n_examples=n_examples,
        n_lines=collect.n_lines,
        n_bytes=n_bytes,
        errors=collect.errors,
        warnings=collect.warnings,
        n_errors=n_errors,
        n_warnings=n_warnings,
        error_counts=dict(collect.error_counts),
        warning_counts=dict(collect.warning_counts),
        token_stats=TokenStats.from_lengths(lengths, total_loss_tokens) if tokenizer is not None else None,
        n_too_long=n_too_long,
        max_seq_len=max_seq_len,
        overflow=overflow,
    )


def read_examples(path: Path | str, *, max_line_bytes: int = MAX_LINE_BYTES) -> list[dict[str, Any]]:
    """The records of a validated file, normalised (chat: messages with role/content/weight; or
    prompt/completion). Raises DatasetFormatError if the file is not valid after all."""
    path = Path(path)
    collect = IssueCollector(cap=20)
    records = [record for _, _, record in _records(path, max_line_bytes, collect)]
    if collect.error_counts:
        raise DatasetFormatError(path, collect.errors)
    if not records:
        raise DatasetFormatError(path, [DatasetIssue(None, "empty_file", "the file holds no examples")])
    return records
