"""What the dataset validator reports: issues, their codes, token statistics and the report itself."""

from __future__ import annotations

import math
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "ISSUE_CODES",
    "DatasetIssue",
    "DatasetReport",
    "Format",
    "IssueCollector",
    "Overflow",
    "TokenStats",
]

Format = Literal["chat", "prompt_completion"]
Overflow = Literal["truncate", "reject"]

ISSUE_CODES: dict[str, str] = {
    # OpenAI's names
    "data_type": "a line (or a message) is not a JSON object",
    "missing_messages_list": "no non-empty `messages` list (and no prompt/completion either)",
    "message_missing_key": "a message lacks `role` or `content`",
    "message_unrecognized_key": "a message has a key other than role, content, weight",
    "unrecognized_role": "a role other than system, user, assistant",
    "missing_content": "a message's content is missing, empty, or not a string",
    "example_missing_assistant_message": "a conversation without an assistant message",
    # ours
    "empty_file": "the file holds no examples",
    "blank_line": "an empty or whitespace-only line",
    "invalid_utf8": "the line is not valid UTF-8",
    "invalid_json": "the line is not one valid JSON value",
    "line_too_long": "the line is longer than max_line_bytes",
    "example_unrecognized_key": "a top-level key the format does not have (e.g. tools, metadata)",
    "invalid_weight": "weight other than 0 or 1, or weight on a non-assistant message",
    "mixed_formats": "chat and prompt/completion examples in one file",
    "missing_prompt": "a prompt/completion example without `prompt`",
    "missing_completion": "a prompt/completion example without `completion`",
    "invalid_prompt": "`prompt` is not a string",
    "invalid_completion": "`completion` is not a string or is empty",
    "too_few_examples": "fewer examples than min_examples",
    "chat_template_error": "the base model's chat template cannot render the conversation",
    "too_long": "more tokens than max_seq_len, with overflow='reject' (error) or 'truncate' (warning)",
    "no_trainable_tokens": "nothing in the example carries loss (all weights 0, or truncated away)",
}


@dataclass(frozen=True)
class DatasetIssue:
    """One problem: `line` is 1-based, None for whole-file problems."""

    line: int | None
    code: str
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else "file"
        return f"{where}: [{self.code}] {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "code": self.code, "message": self.message}


@dataclass(frozen=True)
class TokenStats:
    """Token counts per example, before truncation; loss tokens after it (what training will see)."""

    n_examples: int
    min: int
    mean: float
    p50: int
    p95: int
    max: int
    total_tokens: int
    total_loss_tokens: int

    @classmethod
    def from_lengths(cls, lengths: array, total_loss_tokens: int) -> TokenStats | None:
        if not lengths:
            return None
        ordered = sorted(lengths)

        def nearest_rank(q: float) -> int:
            return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

        total = sum(ordered)
        return cls(
            n_examples=len(ordered),
            min=ordered[0],
            mean=total / len(ordered),
            p50=nearest_rank(0.5),
            p95=nearest_rank(0.95),
            max=ordered[-1],
            total_tokens=total,
            total_loss_tokens=total_loss_tokens,
        )


@dataclass
class DatasetReport:
    """Everything the validator found. `errors`/`warnings` list the first `max_issues` of each;
    `n_errors`/`n_warnings` and the per-code counts cover all of them."""

    ok: bool
    format: Format | None
    n_examples: int  # examples without errors (the ones training will use)
    n_lines: int
    n_bytes: int
    errors: list[DatasetIssue] = field(default_factory=list)
    warnings: list[DatasetIssue] = field(default_factory=list)
    n_errors: int = 0
    n_warnings: int = 0
    error_counts: dict[str, int] = field(default_factory=dict)
    warning_counts: dict[str, int] = field(default_factory=dict)
    token_stats: TokenStats | None = None
    n_too_long: int = 0
    max_seq_len: int | None = None
    overflow: Overflow = "truncate"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, for the API to return as is."""
        return {
            "ok": self.ok,
            "format": self.format,
            "n_examples": self.n_examples,
            "n_lines": self.n_lines,
            "n_bytes": self.n_bytes,
            "n_errors": self.n_errors,
            "n_warnings": self.n_warnings,
            "error_counts": dict(self.error_counts),
            "warning_counts": dict(self.warning_counts),
            "errors": [i.to_dict() for i in self.errors],
            "warnings": [i.to_dict() for i in self.warnings],
            "errors_truncated": self.n_errors > len(self.errors),
            "warnings_truncated": self.n_warnings > len(self.warnings),
            "token_stats": None if self.token_stats is None else vars(self.token_stats).copy(),
            "n_too_long": self.n_too_long,
            "max_seq_len": self.max_seq_len,
            "overflow": self.overflow,
        }

    def summary(self) -> str:
        """A few human-readable lines: verdict, counts, token statistics, the first problems."""
        fmt = {"chat": "chat", "prompt_completion": "prompt/completion", None: "unknown"}[self.format]
        verdict = "valid" if self.ok else "INVALID"
        lines = [
            f"{verdict}: {fmt} format, {self.n_examples} valid examples in {self.n_lines} lines "
            f"({self.n_bytes} bytes); {self.n_errors} errors, {self.n_warnings} warnings"
        ]
        for title, counts in (("errors", self.error_counts), ("warnings", self.warning_counts)):
            if counts:
                lines.append(f"{title} by kind: " + ", ".join(f"{c} {k}" for k, c in sorted(counts.items())))
        if self.token_stats is not None:
            s = self.token_stats
            lines.append(
                f"tokens per example: min {s.min}, mean {s.mean:.1f}, p50 {s.p50}, p95 {s.p95}, max {s.max}; "
                f"{s.total_tokens} tokens in all, {s.total_loss_tokens} trained on"
            )
        if self.max_seq_len is not None:
            action = "truncated" if self.overflow == "truncate" else "rejected"
            noun = "example" if self.n_too_long == 1 else "examples"
            lines.append(f"{self.n_too_long} {noun} longer than max_seq_len={self.max_seq_len} ({action})")
        for issue in self.errors + self.warnings:
            lines.append(f"  {issue}")
        if self.n_errors > len(self.errors) or self.n_warnings > len(self.warnings):
            lines.append(f"  ... first {len(self.errors)} errors and {len(self.warnings)} warnings shown")
        return "\n".join(lines)


class IssueCollector:
    """Keeps the first `cap` issues of each severity and counts all of them, and the lines seen."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.n_lines = 0
        self.n_records = 0  # lines that are not blank: examples, valid or not
        self.errors: list[DatasetIssue] = []
        self.warnings: list[DatasetIssue] = []
        self.error_counts: Counter[str] = Counter()
        self.warning_counts: Counter[str] = Counter()

    def error(self, line: int | None, code: str, message: str) -> None:
        self.error_counts[code] += 1
        if len(self.errors) < self.cap:
            self.errors.append(DatasetIssue(line, code, message))

    def warning(self, line: int | None, code: str, message: str) -> None:
        self.warning_counts[code] += 1
        if len(self.warnings) < self.cap:
            self.warnings.append(DatasetIssue(line, code, message))
