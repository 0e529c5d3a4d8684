"""Webhooks end to end: a real API (uvicorn), real redis-server, a real receiver on 127.0.0.1 that verifies
every request with the `standardwebhooks` package. Loopback is allowed explicitly where a test delivers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from standardwebhooks import Webhook
from standardwebhooks.exceptions import WebhookVerificationError

from fleet import keys
from fleet.queue import JobStore
from fleet.settings import make_redis
from fleet.webhook_delivery import BATCH, BURST_WAIT_MS, GROUP, MIN_BLOCK_MS, Deliverer
from fleet.webhook_http import AddressRefused, post, resolve_checked
from fleet.webhooks import EVENT_TYPES, EndpointStore, sign
from tests.service.conftest import make_api_settings
from tests.service.webhook_receiver import Receiver, types_of

FAST_RETRIES = {"webhook_allow_private": True, "webhook_backoff_base_s": 0.2, "webhook_backoff_max_s": 1.0,
                "webhook_timeout_s": 5.0}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def hooks_server(start_api_server, tmp_path, redis_server):
    """An API allowed to deliver to loopback, retrying after ~0.2 s."""
    return start_api_server(make_api_settings(tmp_path, redis_server.url, **FAST_RETRIES))


def _create_endpoint(server, api_key: str, url: str, **fields: Any) -> dict[str, Any]:
    with server.client(api_key) as c:
        r = c.post("/v1/webhooks/endpoints", json={"url": url, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def _create_job(server, api_key: str, dataset_path) -> str:
    client = server.openai(api_key)
    with open(dataset_path, "rb") as fh:
        uploaded = client.files.create(file=fh, purpose="fine-tune")
    return client.fine_tuning.jobs.create(model="tiny-llama", training_file=uploaded.id).id


def test_signature_verifies_with_the_standardwebhooks_package():
    secret = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"id":"evt_1","object":"event"}'
    headers = {"webhook-id": "evt_1", "webhook-timestamp": str(int(time.time()))}
    headers["webhook-signature"] = sign(secret, "evt_1", int(headers["webhook-timestamp"]), body)
    assert Webhook(secret).verify(body, headers) == {"id": "evt_1", "object": "event"}
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body + b" ", headers)


def test_a_jobs_events_arrive_signed_in_openais_shape(hooks_server, receiver, dataset_path):
    tenant = hooks_server.create_tenant("team-hooks")
    endpoint = _create_endpoint(hooks_server, tenant.api_key, receiver.url)
    assert endpoint["secret"].startswith("whsec_") and endpoint["event_types"] == list(EVENT_TYPES)
    receiver.secret = endpoint["secret"]

    job_id = _create_job(hooks_server, tenant.api_key, dataset_path)
    client = make_redis(hooks_server.settings)
    jobs = JobStore(client)
    claim = jobs.leases.claim_next_job("worker-1", lease_ms=60_000)
    assert claim is not None and claim.job.id == job_id
    jobs.leases.record_checkpoint(claim.fence, 5, "checkpoints/5", {"train_loss": 1.0})
    jobs.leases.finish_job(claim.fence, "succeeded")
    client.close()

    wanted = {"fine_tuning.job.queued", "fine_tuning.job.running", "fine_tuning.job.checkpoint.created",
              "fine_tuning.job.succeeded"}
    events = receiver.wait_for(f"the events {sorted(wanted)}", lambda ev: wanted <= set(types_of(ev)))
    assert sorted(types_of(events)) == sorted(wanted)  # each once
    by_type = {e["type"]: e for e in events}
    succeeded = by_type["fine_tuning.job.succeeded"]
    assert set(succeeded) == {"id", "object", "created_at", "type", "data"}
    assert succeeded["object"] == "event" and succeeded["id"].startswith("evt_")
    assert succeeded["data"] == {"id": job_id}
    assert by_type["fine_tuning.job.checkpoint.created"]["data"] == {
        "id": job_id, "step": 5, "checkpoint_id": f"ftckpt-{job_id.removeprefix('ftjob-')}-5"}
    for r in receiver.received:  # webhook-id is the event's id
        assert r.headers["webhook-id"] == r.event["id"]


def test_an_endpoint_gets_only_its_event_types_and_only_its_tenants(hooks_server, receiver, dataset_path):
    tenant = hooks_server.create_tenant("team-hooks")
    other = hooks_server.create_tenant("team-other")
    receiver.secret = _create_endpoint(hooks_server, tenant.api_key, receiver.url,
                                       event_types=["fine_tuning.job.cancelled"])["secret"]
    _create_job(hooks_server, other.api_key, dataset_path)  # another tenant's job: nothing for us
    job_id = _create_job(hooks_server, tenant.api_key, dataset_path)
    with hooks_server.client(tenant.api_key) as c:
        assert c.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").status_code == 200
    events = receiver.wait_for("the cancelled event", lambda ev: len(ev) >= 1)
    time.sleep(0.5)  # room for anything that should not come
    assert types_of(receiver.verified_events()) == ["fine_tuning.job.cancelled"]
    assert events[0]["data"] == {"id": job_id}


def test_a_receiver_answering_500_gets_the_event_again_and_the_log_shows_both(hooks_server, receiver):
    tenant = hooks_server.create_tenant("team-hooks")
    endpoint = _create_endpoint(hooks_server, tenant.api_key, receiver.url)
    receiver.secret = endpoint["secret"]
    receiver.fail_next = [500]
    with hooks_server.client(tenant.api_key) as c:
        r = c.post(f"/v1/webhooks/endpoints/{endpoint['id']}/test")
        assert r.status_code == 200, r.text
        event_id = r.json()["event_id"]
        events = receiver.wait_for("the test event after one 500", lambda ev: len(ev) == 1)
        assert events[0]["id"] == event_id and events[0]["type"] == "webhook.test"
        assert [(x.status, x.headers["webhook-id"]) for x in receiver.received] == [(500, event_id), (200, event_id)]
        deadline = time.monotonic() + 10
        while True:  # the log is written just after the answer arrives
            log = c.get(f"/v1/webhooks/endpoints/{endpoint['id']}/deliveries").json()["data"]
            if len(log) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    attempts = [(e["attempt"], e["status_code"], e["outcome"]) for e in log]
    assert attempts == [(2, 200, "delivered"), (1, 500, "retrying")]
    assert log[1]["error"] == "the receiver answered HTTP 500" and log[1]["next_attempt_at"] is not None
    assert all(e["event_id"] == event_id and e["duration_ms"] >= 0 for e in log)


def test_rotating_the_secret_signs_later_events_with_the_new_one(hooks_server, receiver):
    tenant = hooks_server.create_tenant("team-hooks")
    endpoint = _create_endpoint(hooks_server, tenant.api_key, receiver.url)
    with hooks_server.client(tenant.api_key) as c:
        rotated = c.post(f"/v1/webhooks/endpoints/{endpoint['id']}/rotate_secret").json()
        assert rotated["secret"].startswith("whsec_") and rotated["secret"] != endpoint["secret"]
        listed = c.get("/v1/webhooks/endpoints").json()["data"]
        assert [e["id"] for e in listed] == [endpoint["id"]] and "secret" not in listed[0]  # shown once
        receiver.secret = rotated["secret"]
        c.post(f"/v1/webhooks/endpoints/{endpoint['id']}/test")
        receiver.wait_for("the test event signed with the new secret", lambda ev: len(ev) == 1)
    old = receiver.received[0]
    with pytest.raises(WebhookVerificationError):
        Webhook(endpoint["secret"]).verify(old.body, old.headers)


def test_endpoints_are_per_tenant_and_validated(hooks_server, receiver):
    tenant = hooks_server.create_tenant("team-hooks")
    other = hooks_server.create_tenant("team-other")
    endpoint = _create_endpoint(hooks_server, tenant.api_key, receiver.url, event_types=["adapter.version.published"])
    with hooks_server.client(other.api_key) as c:
        assert c.get(f"/v1/webhooks/endpoints/{endpoint['id']}").status_code == 404
        assert c.delete(f"/v1/webhooks/endpoints/{endpoint['id']}").status_code == 404
        assert c.get("/v1/webhooks/endpoints").json()["data"] == []
    with hooks_server.client(tenant.api_key) as c:
        bad = c.post("/v1/webhooks/endpoints", json={"url": receiver.url, "event_types": ["fine_tuning.job.won"]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "event_types[0]"
        bad = c.post("/v1/webhooks/endpoints", json={"url": "ftp://example.com/x"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "url"
        assert c.get(f"/v1/webhooks/endpoints/{endpoint['id']}").json()["event_types"] == ["adapter.version.published"]
        deleted = c.delete(f"/v1/webhooks/endpoints/{endpoint['id']}").json()
        assert deleted == {"id": endpoint["id"], "object": "webhook_endpoint.deleted", "deleted": True}
        assert c.get(f"/v1/webhooks/endpoints/{endpoint['id']}").status_code == 404


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/h", "http://localhost/h", "http://[::1]/h",
                                 "http://169.254.169.254/latest", "http://10.0.0.5/h", "http://[::ffff:127.0.0.1]/h"])
def test_private_addresses_are_refused_by_default(api_server, tenant_a, url):
    with api_server.client(tenant_a.api_key) as c:
        r = c.post("/v1/webhooks/endpoints", json={"url": url})
    assert r.status_code == 400 and r.json()["error"]["param"] == "url", r.text
    assert "LORAFLEET_WEBHOOK_ALLOW_PRIVATE" in r.json()["error"]["message"]


def test_a_name_resolving_to_loopback_is_refused_at_delivery(receiver):
    # A public-looking name is only known at delivery: the resolved address is checked before connecting.
    with pytest.raises(AddressRefused):
        resolve_checked("localhost", 80, allow_private=False)
    port = receiver.url.split(":")[2].split("/")[0]
    result = post(f"http://localhost:{port}/hooks", b"{}", {}, timeout_s=5, allow_private=False)
    assert result.status_code is None and result.error.startswith("refused")
    assert receiver.received == []
    assert post(receiver.url, b"{}", {}, timeout_s=5, allow_private=True).status_code == 200


def test_no_redirect_is_followed(receiver):
    with socket.socket() as listener:  # a receiver that redirects elsewhere: the attempt fails, no second request
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {receiver.url}\r\n"
                             "Content-Length: 0\r\n\r\n".encode())

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        result = post(f"http://127.0.0.1:{port}/", b"{}", {}, timeout_s=5, allow_private=True)
        t.join(timeout=10)
    assert result.status_code == 307 and not result.delivered
    assert receiver.received == []


@pytest.mark.slow
def test_undelivered_events_survive_a_restart_of_redis_and_the_deliverer(
    start_api_server, tmp_path, redis_server, receiver, dataset_path
):
    settings = make_api_settings(tmp_path, redis_server.url, webhook_deliverer_in_api=False, **FAST_RETRIES)
    server = start_api_server(settings)
    tenant = server.create_tenant("team-hooks")
    endpoint = _create_endpoint(server, tenant.api_key, receiver.url)
    receiver.secret = endpoint["secret"]
    receiver.fail_next = [503] * 1000  # down for now
    job_id = _create_job(server, tenant.api_key, dataset_path)  # fine_tuning.job.queued

    client = make_redis(settings)
    first = Deliverer(client, settings)
    first.start()
    deadline = time.monotonic() + 20
    while not receiver.received:
        assert time.monotonic() < deadline, "timed out waiting for the first (failing) attempt"
        time.sleep(0.05)
    first.stop()
    failed_id = receiver.received[0].headers["webhook-id"]

    # A second event, read from the outbox by a deliverer that dies before fanning it out.
    with server.client(tenant.api_key) as c:
        assert c.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").status_code == 200
    read = client.xreadgroup(GROUP, "doomed", {keys.webhook_outbox(): ">"}, count=10)
    assert [f["type"] for _, entries in read for _, f in entries] == ["fine_tuning.job.cancelled"]
    client.close()

    redis_server.kill()  # SIGKILL: only the AOF is left
    redis_server.start()
    receiver.fail_next = []
    client = make_redis(settings)
    second = Deliverer(client, settings, outbox_claim_idle_ms=100)
    second.start()
    try:
        both = {"fine_tuning.job.queued", "fine_tuning.job.cancelled"}
        events = receiver.wait_for("both events after the restart", lambda ev: both <= set(types_of(ev)))
    finally:
        second.stop()
        consumers = {c["name"] for c in client.xinfo_consumers(keys.webhook_outbox(), GROUP)}
        client.close()
    assert second.consumer not in consumers and first.consumer not in consumers  # left the group on stop
    queued = next(e for e in events if e["type"] == "fine_tuning.job.queued")
    assert queued["id"] == failed_id  # the same event, same webhook-id, as before the restart
    assert {e["data"]["id"] for e in events} == {job_id}


def test_a_receiver_trickling_its_answer_cannot_hold_an_attempt_past_its_deadline():
    stop = threading.Event()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        def trickle() -> None:  # one byte every 0.2 s: each read is quick, the answer never ends
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                while not stop.wait(0.2):
                    try:
                        conn.sendall(b"a")
                    except OSError:
                        return

        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        result = post(f"http://127.0.0.1:{port}/", b"{}", {}, timeout_s=1, allow_private=True)
        stop.set()
        t.join(timeout=10)
    assert result.status_code is None and result.error == "no complete answer within 2 s"


def test_lorafleet_webhooks_runs_a_standalone_deliverer_until_sigterm(start_api_server, tmp_path, redis_server,
                                                                      receiver):
    server = start_api_server(make_api_settings(tmp_path, redis_server.url, webhook_deliverer_in_api=False,
                                                **FAST_RETRIES))
    tenant = server.create_tenant("team-hooks")
    endpoint = _create_endpoint(server, tenant.api_key, receiver.url)
    receiver.secret = endpoint["secret"]
    env = {**os.environ, "LORAFLEET_REDIS_URL": redis_server.url, "LORAFLEET_WEBHOOK_ALLOW_PRIVATE": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "webhooks", "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with server.client(tenant.api_key) as c:
            event_id = c.post(f"/v1/webhooks/endpoints/{endpoint['id']}/test").json()["event_id"]
        events = receiver.wait_for("the test event from `lorafleet webhooks`", lambda ev: len(ev) == 1, timeout_s=30)
        assert events[0]["id"] == event_id
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output


def test_an_event_never_accepted_is_given_up_after_the_retry_window(start_api_server, tmp_path, redis_server, receiver):
    settings = make_api_settings(tmp_path, redis_server.url, **{**FAST_RETRIES, "webhook_retry_window_s": 1.0})
    server = start_api_server(settings)
    tenant = server.create_tenant("team-hooks")
    endpoint = _create_endpoint(server, tenant.api_key, receiver.url)
    receiver.fail_next = [500] * 1000
    with server.client(tenant.api_key) as c:
        c.post(f"/v1/webhooks/endpoints/{endpoint['id']}/test")
        deadline = time.monotonic() + 20
        while True:
            log = c.get(f"/v1/webhooks/endpoints/{endpoint['id']}/deliveries").json()["data"]
            if log and log[0]["outcome"] == "failed":
                break
            assert time.monotonic() < deadline, f"timed out waiting for the delivery to be given up: {log}"
            time.sleep(0.05)
    assert all(e["outcome"] == "retrying" for e in log[1:]) and log[0]["next_attempt_at"] is None
    client = make_redis(settings)
    try:
        assert client.zcard(keys.webhook_due()) == 0  # nothing left to send
    finally:
        client.close()
    attempts = len(receiver.received)
    time.sleep(0.5)
    assert len(receiver.received) == attempts  # no attempt after giving up


def test_a_deliverer_carries_on_after_the_outbox_and_its_group_are_flushed(tmp_path, redis_server, receiver):
    settings = make_api_settings(tmp_path, redis_server.url, **FAST_RETRIES)
    client = make_redis(settings)
    deliverer = Deliverer(client, settings)
    deliverer.start()
    try:
        receiver.secret = EndpointStore(client).create("t1", receiver.url, EVENT_TYPES).secret
        JobStore(client).create_job("t1", model="m", training_file="f")
        receiver.wait_for("the first job's event", lambda ev: len(ev) == 1)
        client.flushall()  # the outbox and its consumer group are gone
        receiver.secret = EndpointStore(client).create("t1", receiver.url, EVENT_TYPES).secret
        job_id = JobStore(client).create_job("t1", model="m", training_file="f").job.id
        receiver.wait_for("the second job's event", lambda ev: any(e["data"]["id"] == job_id for e in ev))
    finally:
        deliverer.stop()
        client.close()



class _Monitor:
    """Every command Redis runs while open (MONITOR on its own connection), as (client type, command)."""

    def __init__(self, client) -> None:
        self._client = client
        self.commands: list[tuple[str, str]] = []
        self._monitor = client.monitor().__enter__()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            command = self._monitor.next_command()
            if "monitor-end" in command["command"]:
                return
            self.commands.append((command["client_type"], command["command"]))

    def close(self) -> list[tuple[str, str]]:
        self._client.echo("monitor-end")
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "timed out waiting for MONITOR to see its end marker"
        self._monitor.__exit__(None, None, None)
        return self.commands


def test_events_of_tenants_without_endpoints_are_acknowledged_without_reading_endpoints(
        tmp_path, redis_server, receiver):
    settings = make_api_settings(tmp_path, redis_server.url, **FAST_RETRIES)
    client = make_redis(settings)
    receiver.secret = EndpointStore(client).create("t1", receiver.url, EVENT_TYPES).secret
    for _ in range(5):
        JobStore(client).create_job("t2", model="m", training_file="f")  # t2 has no endpoint
    watched_job = JobStore(client).create_job("t1", model="m", training_file="f").job.id
    client.xadd(keys.webhook_outbox(), {"type": "adapter.version.published", "data": "{}"})  # names no tenant
    deliverer = Deliverer(client, settings)
    monitor = _Monitor(client)
    try:
        with ThreadPoolExecutor(max_workers=2) as senders:
            for _ in range(5):
                deliverer.step(senders, block_ms=50)
            receiver.wait_for("t1's event", lambda ev: len(ev) == 1)
        commands = monitor.close()
        sent = [command for client_type, command in commands if client_type != "lua"]
        reads_of_t2 = [c for c in sent if keys.tenant_webhooks("t2") in c]
        assert reads_of_t2 and all(c.startswith("EVALSHA") for c in reads_of_t2)  # only the batch's script
        assert len([c for c in sent if c.startswith("XAUTOCLAIM")]) == 1  # every few seconds, not every loop
        assert client.xlen(keys.webhook_outbox()) == 0
        assert client.xpending(keys.webhook_outbox(), GROUP)["pending"] == 0
        assert [e["data"]["id"] for e in receiver.verified_events()] == [watched_job]
    finally:
        client.close()


def test_under_a_stream_of_events_the_deliverer_reads_the_outbox_at_most_every_burst_wait(tmp_path, redis_server):
    settings = make_api_settings(tmp_path, redis_server.url, **FAST_RETRIES)
    client = make_redis(settings)
    jobs = JobStore(client)
    client.config_resetstat()
    deliverer = Deliverer(client, settings)
    started = time.monotonic()
    deliverer.start()
    try:
        created = 0
        while time.monotonic() - started < 1.0:  # one event per create, as fast as this machine goes
            jobs.create_job("t2", model="m", training_file="f")
            created += 1
        deadline = time.monotonic() + 20
        while client.xlen(keys.webhook_outbox()):
            assert time.monotonic() < deadline, "timed out waiting for the deliverer to acknowledge every event"
            time.sleep(0.05)
    finally:
        deliverer.stop()
        elapsed_s = time.monotonic() - started
        reads = int(client.info("commandstats")["cmdstat_xreadgroup"]["calls"])
        client.close()
    # Every read follows the previous one by at least BURST_WAIT_MS (after events) or MIN_BLOCK_MS (none),
    # except after a full batch (a backlog is drained at once).
    bound = elapsed_s / (min(BURST_WAIT_MS, MIN_BLOCK_MS) / 1000) + 2 + created / BATCH
    assert reads <= bound, f"{reads} outbox reads for {created} events in {elapsed_s:.2f} s"
