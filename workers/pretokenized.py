"""A dataset tokenized once, stored for every rank to read instead of tokenizing it again.

The dispatcher tokenizes each dataset file while checking it (`workers.datasets.validate_dataset`),
and writes the examples with `write_pretokenized`; each rank's loop reads them with
`read_pretokenized`. The format is one `.npz` (numpy, no pickle): every example's `input_ids` and
`labels` concatenated (int32), `offsets` (int64, n + 1: example i is `[offsets[i], offsets[i+1])`),
`n_tokens_untruncated` (int64, n), and `key`, the UTF-8 JSON of the `PretokenizedKey` the examples
were made under: the format version, the dataset file's sha256, the tokenizer's fingerprint, and the
options (`max_seq_len`, `train_on_inputs`). A reader passes the key it expects; any difference raises
`PretokenizedMismatch`, so a file made from another dataset, tokenizer or options is never trained on.
Neither function cares where the file came from (the job's work dir today, the object store later).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workers.tokenization import TokenizedExample

__all__ = [
    "FORMAT_VERSION",
    "PretokenizedKey",
    "PretokenizedMismatch",
    "file_sha256",
    "key_for",
    "read_pretokenized",
    "tokenizer_fingerprint",
    "write_pretokenized",
]

FORMAT_VERSION = 1


class PretokenizedMismatch(ValueError):
    """A pre-tokenized file made under another dataset, tokenizer or options than the reader expects."""


@dataclass(frozen=True)
class PretokenizedKey:
    """What a pre-tokenized file's examples depend on; equal keys mean equal examples."""

    dataset_sha256: str
    tokenizer: str  # tokenizer_fingerprint
    max_seq_len: int | None
    train_on_inputs: bool
    version: int = FORMAT_VERSION


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of everything in the tokenizer that decides the ids and labels: its vocabulary and
    rules (the fast tokenizer's serialized form), chat template, and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = {
        "backend": backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items())),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", [])),
        "eos_token_id": getattr(tokenizer, "eos_token_id", None),
        "bos_token_id": getattr(tokenizer, "bos_token_id", None),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def key_for(dataset: Path | str, tokenizer: Any, *, max_seq_len: int | None, train_on_inputs: bool) -> PretokenizedKey:
    """The key of `dataset` tokenized by `tokenizer` with these options (hashes the file and the tokenizer)."""
    return PretokenizedKey(
        dataset_sha256=file_sha256(dataset),
        tokenizer=tokenizer_fingerprint(tokenizer),
        max_seq_len=max_seq_len,
        train_on_inputs=train_on_inputs,
    )


def write_pretokenized(path: Path | str, examples: Sequence[TokenizedExample], key: PretokenizedKey) -> Path:
    """Write `examples` under `key` to `path` (a `.npz`; written to a temp file, then renamed into place)."""
    path = Path(path)
    lengths = np.fromiter((len(e) for e in examples), dtype=np.int64, count=len(examples))
    offsets = np.zeros(len(examples) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    input_ids = np.fromiter((t for e in examples for t in e.input_ids), dtype=np.int32, count=int(offsets[-1]))
    labels = np.fromiter((t for e in examples for t in e.labels), dtype=np.int32, count=int(offsets[-1]))
    untruncated = np.fromiter((e.n_tokens_untruncated for e in examples), dtype=np.int64, count=len(examples))
    key_bytes = np.frombuffer(json.dumps(asdict(key), sort_keys=True).encode(), dtype=np.uint8)
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "wb") as f:
        np.savez(f, input_ids=input_ids, labels=labels, offsets=offsets, n_tokens_untruncated=untruncated,
                 key=key_bytes)
    tmp.replace(path)
    return path


def read_pretokenized(path: Path | str, expect: PretokenizedKey) -> list[TokenizedExample]:
    """The examples stored at `path`; raises PretokenizedMismatch unless they were made under `expect`."""
    with np.load(path, allow_pickle=False) as data:
        stored = json.loads(data["key"].tobytes().decode())
        if stored != asdict(expect):
            differ = sorted(k for k in set(stored) | set(asdict(expect)) if stored.get(k) != asdict(expect).get(k))
            raise PretokenizedMismatch(
                f"{path} was tokenized under other settings ({', '.join(differ)} differ); "
                "tokenize the dataset again (drop the pre-tokenized file from the spec)"
            )
        offsets = data["offsets"].tolist()
        input_ids = data["input_ids"].tolist()
        labels = data["labels"].tolist()
        untruncated = data["n_tokens_untruncated"].tolist()
    return [
        TokenizedExample(
            input_ids=input_ids[offsets[i] : offsets[i + 1]],
            labels=labels[offsets[i] : offsets[i + 1]],
            n_tokens_untruncated=untruncated[i],
        )
        for i in range(len(untruncated))
    ]
