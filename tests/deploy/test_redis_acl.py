"""Redis as the deployment runs it: infra/redis.conf with the ACL file infra/redis-acl.sh writes, served by
a real redis-server. lorafleet logs in as `lorafleet` with the password in LORAFLEET_REDIS_URL; without it,
or with the wrong one, Redis refuses and says so."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from fleet.settings import Settings, make_redis
from tests.conftest import free_port, wait_for_port
from tests.deploy.conftest import ROOT

PASSWORD = "Xq3_acl-test-password"


def _write_acl(path: Path, password: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(ROOT / "infra/redis-acl.sh"), str(path)], capture_output=True, text=True,
                          env={**os.environ, "REDIS_PASSWORD": password}, timeout=30)


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[int]:
    """redis-server with the repository's redis.conf and ACL file; its port. Only dir, port and bind
    are overridden (the container's /data and the compose network's interface)."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed: run `make test` (it installs it with apt-get)"
    acl = tmp_path / "users.acl"
    assert _write_acl(acl, PASSWORD).returncode == 0
    port = free_port()
    proc = subprocess.Popen(
        [binary, str(ROOT / "infra/redis.conf"), "--aclfile", str(acl), "--dir", str(tmp_path),
         "--port", str(port), "--bind", "127.0.0.1", "--logfile", str(tmp_path / "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc=proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_acl_file_holds_a_hash_not_the_password(tmp_path: Path) -> None:
    acl = tmp_path / "users.acl"
    assert _write_acl(acl, PASSWORD).returncode == 0
    text = acl.read_text()
    assert PASSWORD not in text
    assert "user default off" in text and "user lorafleet on #" in text
    assert oct(acl.stat().st_mode & 0o777) == "0o600"


def test_acl_script_refuses_an_empty_password(tmp_path: Path) -> None:
    result = _write_acl(tmp_path / "users.acl", "")
    assert result.returncode != 0
    assert "REDIS_PASSWORD" in result.stderr
    assert not (tmp_path / "users.acl").exists()


def test_lorafleet_works_with_the_password_in_the_url(acl_redis: int) -> None:
    client = make_redis(Settings(redis_url=f"redis://lorafleet:{PASSWORD}@127.0.0.1:{acl_redis}/0"))
    assert client.ping()
    client.set("lorafleet:deploy-check", "ok")
    assert client.get("lorafleet:deploy-check") == "ok"
    assert client.acl_whoami() == "lorafleet"
    # the script sent by every fleet store needs EVAL/EVALSHA: +@all grants them
    assert client.eval("return redis.call('GET', KEYS[1])", 1, "lorafleet:deploy-check") == "ok"


@pytest.mark.parametrize(
    ("userinfo", "message"),
    [("", "Authentication required|HELLO must be called with the client already authenticated"),
     (f":{PASSWORD}@", "invalid username-password pair"),  # the default user is off
     ("lorafleet:wrong@", "invalid username-password pair")],
    ids=["no-credentials", "default-user", "wrong-password"],
)
def test_without_the_right_login_redis_refuses_with_a_clear_message(acl_redis: int, userinfo: str,
                                                                     message: str) -> None:
    client = make_redis(Settings(redis_url=f"redis://{userinfo}127.0.0.1:{acl_redis}/0"))
    with pytest.raises(redis.AuthenticationError, match=message):
        client.ping()


def _start(binary: str, args: list[str], port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([binary, *args, "--port", str(port), "--bind", "127.0.0.1", "--logfile", str(log)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, proc=proc)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=10)


def test_rdb_backup_over_the_network_restores_as_docs_deploy_says(acl_redis: int, tmp_path: Path) -> None:
    """docs/deploy.md, "Backups": `redis-cli --user lorafleet --rdb FILE` as the ACL user, then restore:
    dump.rdb in an empty data dir, start with --appendonly no, CONFIG SET appendonly yes, restart as usual."""
    source = make_redis(Settings(redis_url=f"redis://lorafleet:{PASSWORD}@127.0.0.1:{acl_redis}/0"))
    source.hset("lorafleet:job:ftjob-1", mapping={"status": "running", "attempt": "2"})
    backup = tmp_path / "backup.rdb"
    subprocess.run(["redis-cli", "-p", str(acl_redis), "--user", "lorafleet", "--rdb", str(backup)],
                   env={**os.environ, "REDISCLI_AUTH": PASSWORD}, check=True, capture_output=True, timeout=60)

    binary = shutil.which("redis-server")
    assert binary
    restored = tmp_path / "restored"
    restored.mkdir()
    shutil.copy(backup, restored / "dump.rdb")
    acl = tmp_path / "users.acl"
    conf = [str(ROOT / "infra/redis.conf"), "--aclfile", str(acl), "--dir", str(restored)]
    port = free_port()
    url = f"redis://lorafleet:{PASSWORD}@127.0.0.1:{port}/0"
    proc = _start(binary, [*conf, "--appendonly", "no"], port, tmp_path / "restore.log")
    try:
        client = make_redis(Settings(redis_url=url))
        client.config_set("appendonly", "yes")
        deadline = time.monotonic() + 30
        while client.info("persistence")["aof_rewrite_in_progress"] or client.info("persistence")[
                "aof_rewrite_scheduled"]:
            assert time.monotonic() < deadline, "Redis did not finish rewriting the AOF within 30 s"
            time.sleep(0.1)
        client.close()
    finally:
        _stop(proc)
    (restored / "dump.rdb").unlink()  # the AOF alone must carry the data now
    proc = _start(binary, conf, port, tmp_path / "after.log")
    try:
        client = make_redis(Settings(redis_url=url))
        assert client.hgetall("lorafleet:job:ftjob-1") == {"status": "running", "attempt": "2"}
        assert client.config_get("appendonly") == {"appendonly": "yes"}
    finally:
        _stop(proc)


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_lorafleet_refuses_to_start_when_redis_refuses_its_login(acl_redis: int, tmp_path: Path,
                                                                 command: str) -> None:
    """A wrong password is a configuration error: the API and the dispatcher stop at once and say what to
    fix, instead of serving 503s or retrying forever as if Redis were down."""
    env = {**os.environ, "LORAFLEET_REDIS_URL": f"redis://lorafleet:wrong@127.0.0.1:{acl_redis}/0",
           "LORAFLEET_DATA_DIR": str(tmp_path / "var"), "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "service.cli", command]
    if command == "serve":
        argv += ["--port", str(free_port())]
    try:
        result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`lorafleet {command}` kept running for 60 s with a password Redis refuses")
    assert result.returncode != 0
    message = " ".join(result.stderr.split())
    assert "invalid username-password pair" in message and "LORAFLEET_REDIS_URL" in message, result.stderr
    assert "wrong" not in message, "the password must not be printed"


def test_the_api_serves_with_the_password_in_the_url(acl_redis: int, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "LORAFLEET_REDIS_URL": f"redis://lorafleet:{PASSWORD}@127.0.0.1:{acl_redis}/0",
           "LORAFLEET_DATA_DIR": str(tmp_path / "var"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, timeout_s=60, proc=proc)
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=20)
