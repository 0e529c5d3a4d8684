"""Tokenizing a job's data once vs 1 + world_size times, and a checkpoint call with a slow object store.

    python bench/tokenize_once.py [--examples 2000] [--world-size 2] [--put-delay 0.05]

Tokenization: "before" is the dispatcher's check plus every rank tokenizing the file again; "after"
is the check (keeping its examples), writing the .npz, and every rank reading it. Checkpoint: the
time `JobReporter.checkpoint` blocks the calling step when each object-store write takes
`--put-delay` seconds (a LocalObjectStore with a sleep), synchronously (the upload and record the
uploader runs) vs handed to the background uploader. Needs a redis-server on PATH.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet.objectstore import LocalObjectStore  # noqa: E402
from fleet.queue import JobStore  # noqa: E402
from fleet.settings import Settings, make_object_store, make_redis  # noqa: E402
from workers.datasets import read_examples, validate_dataset  # noqa: E402
from workers.dispatcher import JobReporterFactory  # noqa: E402
from workers.pretokenized import key_for, read_pretokenized, write_pretokenized  # noqa: E402
from workers.synthetic import write_synthetic_dataset  # noqa: E402
from workers.tiny_model import make_tiny_model  # noqa: E402
from workers.tokenization import tokenize_dataset  # noqa: E402


class SlowStore(LocalObjectStore):
    def __init__(self, root: Path, delay_s: float) -> None:
        super().__init__(root)
        self.delay_s = delay_s

    def put_file(self, key: str, path: Path) -> None:
        time.sleep(self.delay_s)
        super().put_file(key, path)


def bench_tokenization(tmp: Path, n_examples: int, world_size: int, max_seq_len: int = 256) -> None:
    from transformers import AutoTokenizer

    model = make_tiny_model(tmp / "model")
    data = write_synthetic_dataset(tmp / "train.jsonl", n_examples, seed=0, task="sort")
    tokenizer = AutoTokenizer.from_pretrained(str(model))

    start = time.perf_counter()
    validate_dataset(data, tokenizer=tokenizer, max_seq_len=max_seq_len)
    check = time.perf_counter() - start
    start = time.perf_counter()
    tokenize_dataset(read_examples(data), tokenizer, max_seq_len=max_seq_len)
    rank_before = time.perf_counter() - start

    start = time.perf_counter()
    examples: list = []
    validate_dataset(data, tokenizer=tokenizer, max_seq_len=max_seq_len, examples_out=examples)
    key = key_for(data, tokenizer, max_seq_len=max_seq_len, train_on_inputs=False)
    stored = write_pretokenized(tmp / "train.tokens.npz", examples, key)
    check_and_write = time.perf_counter() - start
    start = time.perf_counter()
    read_pretokenized(stored, key_for(data, tokenizer, max_seq_len=max_seq_len, train_on_inputs=False))
    rank_after = time.perf_counter() - start
    before, after = check + world_size * rank_before, check_and_write + world_size * rank_after
    print(f"tokenization, {n_examples} examples: check {check:.2f} s (with the write {check_and_write:.2f} s); "
          f"per rank: tokenize {rank_before:.2f} s, read {rank_after:.3f} s; a job of {world_size} ranks: "
          f"{before:.2f} s before, {after:.2f} s after; .npz {stored.stat().st_size / 1e3:.0f} kB")


def bench_checkpoint(tmp: Path, delay_s: float, n_files: int = 6) -> None:
    port = 6390
    server = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                              stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        settings = Settings(redis_url=f"redis://127.0.0.1:{port}/0", data_dir=tmp / "var")
        jobs = JobStore(make_redis(settings))
        jobs.create_job("t1", model="tiny-llama", training_file="file-1")
        claim = jobs.leases.claim_next_job("bench", lease_ms=60_000)
        ckpt = tmp / "ckpt"
        ckpt.mkdir()
        for i in range(n_files):
            (ckpt / f"part-{i}.bin").write_bytes(b"\0" * (4 << 20))
        reporter = JobReporterFactory(settings, "t1", claim.fence)()
        reporter.store = SlowStore(make_object_store(settings).root, delay_s)

        start = time.perf_counter()
        reporter._upload_and_record(1, ckpt)  # what checkpoint() did in the step before
        sync = time.perf_counter() - start
        start = time.perf_counter()
        reporter.checkpoint(2, ckpt)
        handed = time.perf_counter() - start
        reporter.close()
        assert jobs.latest_checkpoint(claim.job.id).step == 2
        print(f"checkpoint of {n_files} x 4 MB files, {delay_s * 1000:.0f} ms per object-store write: the step "
              f"blocked {sync * 1000:.0f} ms synchronously, {handed * 1000:.1f} ms with the background uploader")
    finally:
        server.terminate()
        server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--put-delay", type=float, default=0.05)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bench_tokenization(Path(tmp), args.examples, args.world_size)
        bench_checkpoint(Path(tmp), args.put_delay)


if __name__ == "__main__":
    main()
