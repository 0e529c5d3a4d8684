"""The dataset validator: a corpus of broken files, each problem found on its exact line; valid files pass."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from workers.datasets import ISSUE_CODES, DatasetFormatError, read_examples, validate_dataset


def chat(*turns: tuple[str, str], **extra) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns], **extra}


GOOD = chat(("system", "Reverse the words."), ("user", "a b c"), ("assistant", "c b a"))
GOOD_LINE = json.dumps(GOOD)


def jsonl(*records) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()


def write(tmp_path: Path, data: bytes, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def error_lines(report) -> list[tuple[int | None, str]]:
    return [(issue.line, issue.code) for issue in report.errors]


# Each broken file: its bytes and the exact (line, code) errors expected, in order. Good lines pad the
# files so that line numbers are not trivially 1, and min_examples stays out of the way (set to 1).
CORPUS: dict[str, tuple[bytes, list[tuple[int | None, str]]]] = {
    "data_type": (jsonl(GOOD, [GOOD], '"just a string"'), [(2, "data_type"), (3, "data_type")]),
    "missing_messages_list": (
        jsonl(GOOD, {"text": "hi"}, {"messages": []}, {"messages": "hi"}),
        [(2, "missing_messages_list"), (3, "missing_messages_list"), (4, "missing_messages_list")],
    ),
    "message_missing_key": (
        jsonl(
            GOOD,
            {"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]},
        ),
        [(2, "message_missing_key"), (3, "message_missing_key")],
    ),
    "message_unrecognized_key": (
        jsonl(
            GOOD,
            {
                "messages": [
                    {"role": "user", "content": "hi", "name": "bob"},
                    {"role": "assistant", "content": "yo"},
                ]
            },
        ),
        [(2, "message_unrecognized_key")],
    ),
    "unrecognized_role": (
        jsonl(chat(("user", "hi"), ("tool", "42"), ("assistant", "yo")), GOOD),
        [(1, "unrecognized_role")],
    ),
    "missing_content": (
        jsonl(
            GOOD,
            GOOD,
            chat(("user", ""), ("assistant", "yo")),
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ["a"]}]},
        ),
        [(3, "missing_content"), (4, "missing_content")],
    ),
    "example_missing_assistant_message": (
        jsonl(GOOD, chat(("system", "s"), ("user", "hi"))),
        [(2, "example_missing_assistant_message")],
    ),
    "example_unrecognized_key": (
        jsonl(GOOD, chat(("user", "hi"), ("assistant", "yo"), tools=[])),
        [(2, "example_unrecognized_key")],
    ),
    "invalid_weight": (
        jsonl(
            GOOD,
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo", "weight": 2},
                ]
            },
            {
                "messages": [
                    {"role": "user", "content": "hi", "weight": 1},
                    {"role": "assistant", "content": "yo"},
                ]
            },
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "a", "weight": True},
                ]
            },
        ),
        [(2, "invalid_weight"), (3, "invalid_weight"), (4, "invalid_weight")],
    ),
    "invalid_json": (
        jsonl(GOOD, '{"messages": [', GOOD, GOOD_LINE + " " + GOOD_LINE, '{"prompt": "a", "completion": NaN}'),
        [(2, "invalid_json"), (4, "invalid_json"), (5, "invalid_json")],
    ),
    "blank_line": (jsonl(GOOD, "", GOOD, "   \t", GOOD), [(2, "blank_line"), (4, "blank_line")]),
    "invalid_utf8": (
        jsonl(GOOD, GOOD) + '{"prompt": "caf\u00e9", "completion": "x"}\n'.encode("latin-1") + jsonl(GOOD),
        [(3, "invalid_utf8")],
    ),
    "mixed_formats": (jsonl(GOOD, {"prompt": "a", "completion": "b"}, GOOD), [(2, "mixed_formats")]),
    "prompt_completion": (
        jsonl(
            {"prompt": "a", "completion": "b"},
            {"prompt": 3, "completion": "b"},
            {"prompt": "a"},
            {"completion": "b"},
            {"prompt": "a", "completion": ""},
            {"prompt": "a", "completion": "b", "id": 1},
        ),
        [
            (2, "invalid_prompt"),
            (3, "missing_completion"),
            (4, "missing_prompt"),
            (5, "invalid_completion"),
            (6, "example_unrecognized_key"),
        ],
    ),
    "several_problems_on_one_line": (
        jsonl({"messages": [{"role": "robot", "content": 1, "extra": 0}, {"content": "x"}]}),
        [
            (1, "message_unrecognized_key"),
            (1, "unrecognized_role"),
            (1, "missing_content"),
            (1, "message_missing_key"),
            (1, "example_missing_assistant_message"),
        ],
    ),
}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_each_broken_file_gets_its_errors_on_the_exact_lines(tmp_path, name):
    data, expected = CORPUS[name]
    report = validate_dataset(write(tmp_path, data), min_examples=1)
    assert not report.ok
    assert error_lines(report) == expected
    assert report.n_errors == len(expected)
    assert all(issue.code in ISSUE_CODES and issue.message for issue in report.errors)


def test_the_corpus_covers_every_line_level_error_code():
    covered = {code for _, expected in CORPUS.values() for _, code in expected}
    whole_file_or_tokenizer = {
        "empty_file",
        "too_few_examples",
        "line_too_long",
        "chat_template_error",
        "too_long",
        "no_trainable_tokens",
    }
    assert set(ISSUE_CODES) - whole_file_or_tokenizer <= covered


def test_valid_chat_and_prompt_completion_files_pass(tmp_path):
    weighted = chat(("user", "hi"), ("assistant", "one"), ("user", "again"), ("assistant", "two"))
    weighted["messages"][1]["weight"] = 0
    chat_file = write(tmp_path, jsonl(*[GOOD] * 11, weighted), "chat.jsonl")
    report = validate_dataset(chat_file)
    assert report.ok, report.summary()
    assert (report.format, report.n_examples, report.n_lines, report.n_errors) == ("chat", 12, 12, 0)
    pc_file = write(tmp_path, jsonl(*[{"prompt": "2+2=", "completion": " 4"}] * 10), "pc.jsonl")
    assert validate_dataset(pc_file).format == "prompt_completion"
    records = read_examples(chat_file)
    assert records[-1] == weighted and records[0] == GOOD


def test_windows_line_endings_bom_and_a_missing_final_newline_are_accepted(tmp_path):
    data = b"\xef\xbb\xbf" + b"\r\n".join([GOOD_LINE.encode()] * 10)
    report = validate_dataset(write(tmp_path, data))
    assert report.ok, report.summary()
    assert report.n_examples == 10


def test_non_utf8_error_says_which_byte(tmp_path):
    report = validate_dataset(write(tmp_path, jsonl(GOOD) + b'{"prompt": "\xff"}\n'), min_examples=1)
    assert error_lines(report) == [(2, "invalid_utf8")]
    assert "byte 13" in report.errors[0].message and "0xff" in report.errors[0].message


@pytest.mark.parametrize("data", [b"", b"\n\n", b"  \n"])
def test_an_empty_file_is_one_clear_error(tmp_path, data):
    report = validate_dataset(write(tmp_path, data))
    assert not report.ok and report.n_examples == 0
    assert (None, "empty_file") in error_lines(report)
    assert "too_few_examples" not in report.error_counts


def test_too_few_examples_follows_openai_minimum_of_ten(tmp_path):
    report = validate_dataset(write(tmp_path, jsonl(*[GOOD] * 9)))
    assert error_lines(report) == [(None, "too_few_examples")]
    assert validate_dataset(write(tmp_path, jsonl(*[GOOD] * 9)), min_examples=9).ok


def test_a_10_mb_line_is_reported_without_holding_it_and_the_next_lines_still_checked(tmp_path):
    huge = json.dumps(chat(("user", "x" * (10 * 1024 * 1024)), ("assistant", "y")))
    path = write(tmp_path, jsonl(GOOD, huge, '{"bad json', GOOD))
    tracemalloc.start()
    report = validate_dataset(path, min_examples=1)
    _, peak_bytes = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak_bytes < 4 * 1024 * 1024  # streamed in 1 MiB pieces, never the 10 MB line at once
    assert error_lines(report) == [(2, "line_too_long"), (3, "invalid_json")]
    assert f"{len(huge)} bytes" in report.errors[0].message
    assert report.n_examples == 2
    assert validate_dataset(path, min_examples=1, max_line_bytes=len(huge)).error_counts == {"invalid_json": 1}


def test_a_huge_broken_file_gives_a_bounded_report_that_counts_everything(tmp_path):
    path = write(tmp_path, b"not json\n" * 5000)
    report = validate_dataset(path, max_issues=100)
    assert len(report.errors) == 100 and report.n_errors == 5000
    assert report.error_counts == {"invalid_json": 5000}
    assert report.errors[-1].line == 100
    as_dict = report.to_dict()
    assert as_dict["errors_truncated"] and len(json.dumps(as_dict)) < 20_000
    assert "5000 invalid_json" in report.summary()


def test_read_examples_refuses_an_invalid_file_naming_the_line(tmp_path):
    with pytest.raises(DatasetFormatError, match=r"line 2: \[unrecognized_role\]"):
        read_examples(write(tmp_path, jsonl(GOOD, chat(("bot", "x"), ("assistant", "y")))))


# ----------------------------------------------------------------------------------------- with a tokenizer
@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_token_statistics_and_overlong_examples(tmp_path, tokenizer):
    short = chat(("user", "a"), ("assistant", "b"))
    long = chat(("user", "word " * 60), ("assistant", "done"))
    path = write(tmp_path, jsonl(*[short] * 9, long))
    report = validate_dataset(path, tokenizer=tokenizer, max_seq_len=32)
    n_short = len(tokenizer.apply_chat_template(short["messages"], tokenize=True, return_dict=True)["input_ids"])
    n_long = len(tokenizer.apply_chat_template(long["messages"], tokenize=True, return_dict=True)["input_ids"])
    stats = report.token_stats
    assert (stats.min, stats.p50, stats.p95, stats.max) == (n_short, n_short, n_long, n_long)
    assert stats.total_tokens == 9 * n_short + n_long
    assert stats.mean == pytest.approx((9 * n_short + n_long) / 10)
    assert report.ok and report.n_too_long == 1
    assert [(w.line, w.code) for w in report.warnings] == [(10, "too_long"), (10, "no_trainable_tokens")]
    rejected = validate_dataset(path, tokenizer=tokenizer, max_seq_len=32, overflow="reject")
    assert error_lines(rejected) == [(10, "too_long")] and rejected.n_too_long == 1
    assert (report.n_examples, rejected.n_examples) == (10, 9)
    assert "1 example longer than max_seq_len=32 (rejected)" in rejected.summary()


def test_a_conversation_the_chat_template_refuses_is_reported_on_its_line(tmp_path, tiny_model_dir):
    strict = AutoTokenizer.from_pretrained(tiny_model_dir)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
        "{{ raise_exception('system message must come first') }}{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    late_system = chat(("user", "hi"), ("system", "be nice"), ("assistant", "yo"))
    report = validate_dataset(write(tmp_path, jsonl(GOOD, late_system)), tokenizer=strict, min_examples=1)
    assert error_lines(report) == [(2, "chat_template_error")]
    assert "system message must come first" in report.errors[0].message


def test_all_weights_zero_is_a_warning(tmp_path):
    silent = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "weight": 0}]}
    report = validate_dataset(write(tmp_path, jsonl(silent)), min_examples=1)
    assert report.ok and [(w.line, w.code) for w in report.warnings] == [(1, "no_trainable_tokens")]
