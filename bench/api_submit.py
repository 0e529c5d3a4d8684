"""Job creation through our API vs a bare FastAPI endpoint doing one HSET + RPUSH on the same Redis.

    python bench/api_submit.py [--requests 400] [--rounds 5] [--concurrency 1]

Both servers run as separate uvicorn processes with the same uvicorn settings (one process, no access
log), on one throwaway redis-server, and are driven by the same httpx client code. Ours gets the full
create path: Bearer key lookup, body validation, the training file lookup, LoRA/catalog resolution,
quota and resource checks, the create Lua (job hash, tenant index, queue, outbox event), the "created"
event and the rendered job; its webhook deliverer runs in the same process (the default), fanning out
the `queued` event of each job it creates. The bare endpoint parses the JSON body into a dict,
then HSETs it under a fresh id and RPUSHes the id on a list (two commands, no checks).

Rounds alternate ours / bare (ABAB), so a load spike from other work hits both; the script prints each
side's median requests/s and their ratio (target >= 0.5), and the server CPU each side spent per
request. To see where ours spends it, sample its process with py-spy (`py-spy record --gil -p PID`):
the routes run in the threadpool, which cProfile does not see.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from bench.local_redis import free_port, local_redis, wait_for_port  # noqa: E402

OPERATOR_KEY = "lf-bench-operator-key"
MODEL = "tiny-llama"


# --- the two servers ------------------------------------------------------------------------------------
def _our_settings(redis_url: str, data_dir: Path):  # -> Settings
    from fleet.settings import Settings

    model_dir = data_dir / MODEL
    model_dir.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 128,
              "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}
    (model_dir / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return Settings(redis_url=redis_url, data_dir=data_dir / "var", admin_key=OPERATOR_KEY,
                    catalog={MODEL: {"path": str(model_dir), "quantization": "nf4", "max_rank": 64}})


def _bare_app(redis_url: str):  # -> FastAPI
    import redis
    from fastapi import FastAPI

    app = FastAPI()
    client = redis.Redis.from_url(redis_url, decode_responses=True)

    @app.post("/v1/fine_tuning/jobs")
    def create(body: dict) -> dict:
        job_id = "ftjob-" + uuid.uuid4().hex
        client.hset(f"bare:job:{job_id}", mapping={k: json.dumps(v) for k, v in body.items()})
        client.rpush("bare:queue", job_id)
        return {"id": job_id, "object": "fine_tuning.job", "status": "queued"}

    return app


def _serve(kind: str, port: int, redis_url: str, data_dir: Path) -> None:
    import uvicorn

    if kind == "ours":
        from service.app import create_app

        app = create_app(_our_settings(redis_url, data_dir))
    else:
        app = _bare_app(redis_url)
    uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)).run()


def _start(kind: str, redis_url: str, data_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, __file__, "--serve", kind, "--port", str(port), "--redis", redis_url,
               "--data-dir", str(data_dir)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(command, env=env)
    wait_for_port(port, what=f"the {kind} API server", proc=proc, timeout_s=60)
    return proc, f"http://127.0.0.1:{port}"


# --- the client ------------------------------------------------------------------------------------------
def _our_tenant(url: str) -> tuple[str, str]:
    """A tenant's key and an uploaded 12-example training file on our API."""
    with httpx.Client(base_url=url, timeout=30.0) as client:
        made = client.post("/v1/admin/tenants", json={"name": "bench"},
                           headers={"Authorization": f"Bearer {OPERATOR_KEY}"})
        made.raise_for_status()
        key = made.json()["api_key"]
        lines = [json.dumps({"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                                          {"role": "assistant", "content": str(2 * i)}]}) for i in range(12)]
        uploaded = client.post("/v1/files", headers={"Authorization": f"Bearer {key}"},
                               files={"file": ("train.jsonl", "\n".join(lines).encode())},
                               data={"purpose": "fine-tune"})
        uploaded.raise_for_status()
    return key, uploaded.json()["id"]


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process `pid` has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rate(url: str, key: str, body: dict, n: int, concurrency: int) -> float:
    """Requests/s for `n` creates sent by `concurrency` threads, each with its own keep-alive client."""
    errors: list[str] = []
    per_thread = n // concurrency

    def send() -> None:
        with httpx.Client(base_url=url, timeout=30.0, headers={"Authorization": f"Bearer {key}"}) as client:
            for _ in range(per_thread):
                response = client.post("/v1/fine_tuning/jobs", json=body)
                if response.status_code != 200:
                    errors.append(f"{response.status_code} {response.text[:300]}")
                    return

    threads = [threading.Thread(target=send) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{url} answered an error: {errors[0]}")
    return per_thread * concurrency / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="creates per round and side")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=1, help="client threads (keep-alive connections)")
    parser.add_argument("--serve", choices=["ours", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--redis", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve(args.serve, args.port, args.redis, args.data_dir)
        return

    with tempfile.TemporaryDirectory() as tmp, local_redis() as redis_url:
        ours, our_url = _start("ours", redis_url, Path(tmp))
        bare, bare_url = _start("bare", redis_url, Path(tmp))
        try:
            key, file_id = _our_tenant(our_url)
            body = {"model": MODEL, "training_file": file_id}
            _rate(our_url, key, body, 50, 1)  # warm-up: imports, lru caches, script loading
            _rate(bare_url, key, body, 50, 1)
            rates: dict[str, list[float]] = {"ours": [], "bare": []}
            cpu_ms: dict[str, list[float]] = {"ours": [], "bare": []}
            for _ in range(args.rounds):
                for side, url, proc in (("ours", our_url, ours), ("bare", bare_url, bare)):
                    cpu_before = _cpu_s(proc.pid)
                    rates[side].append(_rate(url, key, body, args.requests, args.concurrency))
                    cpu_ms[side].append(1000 * (_cpu_s(proc.pid) - cpu_before) / args.requests)
            for side in ("ours", "bare"):
                print(f"rounds {side}: " + " ".join(f"{r:.0f}" for r in rates[side]) + " req/s; server CPU "
                      + " ".join(f"{c:.2f}" for c in cpu_ms[side]) + " ms/request")
            ours_rate, bare_rate = statistics.median(rates["ours"]), statistics.median(rates["bare"])
            ours_cpu, bare_cpu = statistics.median(cpu_ms["ours"]), statistics.median(cpu_ms["bare"])
            print(f"ours {ours_rate:.0f} req/s, bare HSET+RPUSH {bare_rate:.0f} req/s: "
                  f"ratio {ours_rate / bare_rate:.2f} (target >= 0.5); "
                  f"server CPU per request {ours_cpu:.2f} vs {bare_cpu:.2f} ms "
                  f"(bare/ours {bare_cpu / ours_cpu:.2f}); {args.rounds} rounds x {args.requests} creates, "
                  f"concurrency {args.concurrency}")
        finally:
            for proc in (ours, bare):
                proc.terminate()
                proc.wait(timeout=15)


if __name__ == "__main__":
    main()
