"""Delivering webhook events at least once: outbox → per-endpoint deliveries → signed POSTs with retries.

The job scripts (fleet.queue_scripts) append each event to the outbox stream in the same atomic step
as the state change. A `Deliverer` reads the outbox through a consumer group (XREADGROUP; XAUTOCLAIM
takes over what a dead deliverer read but did not finish), turns each event into one delivery per
matching endpoint (a hash, scheduled in a sorted set by next-attempt time) and acknowledges the entry
in the same script; entries of tenants with no endpoint (usually most) are acknowledged in one script
call per batch, without reading any endpoint. Due deliveries are claimed one by one (the claim moves
the score ahead, so one process sends each attempt; a crashed sender's claim runs out and another
retries), POSTed with the Standard Webhooks headers, and retried with exponential backoff and jitter
until the retry window (72 h by default) has passed. Every attempt is logged on its endpoint. Any
number of deliverers may run at once (the API process starts one; `lorafleet webhooks` runs one on its own).
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from redis.exceptions import RedisError, ResponseError

from fleet import keys
from fleet.exceptions import NotFound
from fleet.settings import check_redis_client
from fleet.webhook_http import PostResult, post
from fleet.webhooks import TEST_EVENT_TYPE, Endpoint, EndpointStore, event_id_for, event_payload, sign

if TYPE_CHECKING:
    import redis

    from fleet.settings import Settings

__all__ = ["GROUP", "Deliverer", "send_test_event", "backoff_s"]

logger = logging.getLogger(__name__)

GROUP = "deliverers"
OUTBOX_CLAIM_IDLE_MS = 60_000  # an outbox entry read but unfinished this long belongs to a dead deliverer
OUTBOX_RECLAIM_EVERY_MS = 5_000  # how often to look for such entries (at most every half idle time)
BATCH = 50
MIN_BLOCK_MS, MAX_BLOCK_MS = 50, 1000  # an idle deliverer makes a few Redis calls a second, no more
# After fanning out a partial batch, wait this long before reading again: an event that arrives alone is
# handed on at once, while under a stream of events the deliverer reads (and wakes) ~20 times a second
# instead of once per event, each read taking what arrived meanwhile (its cost in the API's process).
BURST_WAIT_MS = 50
SENDERS = 8  # concurrent POSTs per deliverer, so one slow receiver does not hold up the others
_USER_AGENT = "lorafleet-webhooks/1"

# KEYS: outbox, due, delivery keys ...   ARGV: group ('' when not from the outbox), entry id, now_ms,
# event_id, type, body, then (delivery id, endpoint id) per delivery key.
# Schedules each delivery not already there, then acknowledges and deletes the outbox entry: one step.
_FAN_OUT = """
for i = 3, #KEYS do
  local delivery_id, endpoint_id = ARGV[7 + 2 * (i - 3)], ARGV[8 + 2 * (i - 3)]
  if redis.call('EXISTS', KEYS[i]) == 0 then
    redis.call('HSET', KEYS[i], 'endpoint_id', endpoint_id, 'event_id', ARGV[4], 'type', ARGV[5],
               'body', ARGV[6], 'attempts', 0, 'first_at_ms', ARGV[3])
    redis.call('ZADD', KEYS[2], 'NX', ARGV[3], delivery_id)
  end
end
if ARGV[1] ~= '' then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[1], ARGV[2])
end
return #KEYS - 2
"""

# KEYS: outbox, then the endpoint index (keys.tenant_webhooks) of each entry's tenant.
# ARGV: group, then one entry id per index key, then the ids of entries that name no tenant.
# Acknowledges and deletes every entry whose tenant has no endpoint (or that names none); returns the ids
# of the others, which need a fan-out.
_ACK_UNWATCHED = """
local watched = {}
for i = 2, #ARGV do
  if i <= #KEYS and redis.call('EXISTS', KEYS[i]) == 1 then
    watched[#watched + 1] = ARGV[i]
  else
    redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
    redis.call('XDEL', KEYS[1], ARGV[i])
  end
end
return watched
"""

# KEYS: due.  ARGV: delivery id, claim_ms.  Claims a due delivery by moving its score claim_ms ahead
# (server clock); 0 when it is not due or another deliverer claimed it first.
_CLAIM_DUE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) > now then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return 1
"""


def backoff_s(attempts: int, *, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Delay after the `attempts`-th failure: base·2^(attempts-1), capped, times a jitter in [0.5, 1]."""
    delay = min(max_s, base_s * 2 ** min(attempts - 1, 40))
    return delay * (0.5 + 0.5 * (rng or random).random())


def _now_ms() -> int:
    return int(time.time() * 1000)


def _delivery_id(endpoint_id: str, event_id: str) -> str:
    return f"{endpoint_id}.{event_id}"


def _schedule(script, group: str, entry_id: str, event_id: str, event_type: str, body: bytes,
              endpoints: list[Endpoint]) -> None:
    ids = [_delivery_id(e.id, event_id) for e in endpoints]
    args: list[str] = [group, entry_id, str(_now_ms()), event_id, event_type, body.decode()]
    for delivery_id, endpoint in zip(ids, endpoints, strict=True):
        args += [delivery_id, endpoint.id]
    script(keys=[keys.webhook_outbox(), keys.webhook_due(), *map(keys.webhook_delivery, ids)], args=args)


def send_test_event(client: redis.Redis, endpoint: Endpoint) -> str:
    """Schedule a `webhook.test` event to `endpoint` alone (delivered like any event); its event id."""
    event_id = "evt_test_" + os.urandom(8).hex()
    body = event_payload(event_id, TEST_EVENT_TYPE, int(time.time()), {"id": endpoint.id})
    _schedule(client.register_script(_FAN_OUT), "", "", event_id, TEST_EVENT_TYPE, body, [endpoint])
    return event_id


class Deliverer:
    """One delivering process (or thread): `run(stop)` loops until `stop` is set; `start()` runs it in a
    daemon thread and `stop()` ends it. Several may run against one Redis at once."""

    def __init__(
        self,
        client: redis.Redis,
        settings: Settings,
        *,
        consumer: str | None = None,
        outbox_claim_idle_ms: int = OUTBOX_CLAIM_IDLE_MS,
    ) -> None:
        check_redis_client(client)
        self._r = client
        self._settings = settings
        self._endpoints = EndpointStore(client)
        self._fan_out = client.register_script(_FAN_OUT)
        self._claim_due = client.register_script(_CLAIM_DUE)
        self._outbox_claim_idle_ms = outbox_claim_idle_ms
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        # A claim outlives the longest attempt: resolving, connecting and reading, with room to spare.
        self._claim_ms = int((3 * settings.webhook_timeout_s + 30) * 1000)
        self._group_ready = False
        self._ack_unwatched = client.register_script(_ACK_UNWATCHED)
        self._reclaim_every_s = min(OUTBOX_RECLAIM_EVERY_MS, outbox_claim_idle_ms // 2) / 1000
        self._next_reclaim = 0.0  # time.monotonic() of the next XAUTOCLAIM; the first loop runs one
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()

    # --- running -----------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, args=(self._stop,), name="webhook-deliverer", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)

    def run(self, stop: threading.Event) -> None:
        logger.info("webhook deliverer %s started", self.consumer)
        with ThreadPoolExecutor(max_workers=SENDERS, thread_name_prefix="webhook-send") as senders:
            while not stop.is_set():
                try:
                    if 0 < self.step(senders) < BATCH:  # events are arriving: let a batch gather
                        stop.wait(BURST_WAIT_MS / 1000)
                except ResponseError as e:
                    if "NOGROUP" in str(e):  # the outbox was deleted (e.g. FLUSHALL): make the group again
                        self._group_ready = False
                    else:
                        logger.warning("webhook deliverer: Redis refused a command, retrying in 1 s: %s", e)
                        stop.wait(1.0)
                except RedisError as e:  # Redis restarting: wait and carry on where the outbox says
                    logger.warning("webhook deliverer: Redis error, retrying in 1 s: %s", e)
                    stop.wait(1.0)
                except Exception:  # a bug must not end delivery for the whole process
                    logger.exception("webhook deliverer: unexpected error, retrying in 1 s")
                    stop.wait(1.0)
        self._leave_group()
        logger.info("webhook deliverer %s stopped", self.consumer)

    def _leave_group(self) -> None:
        """Remove this consumer from the group when it holds no entry, so restarts do not pile up names."""
        try:
            pending = self._r.xpending_range(keys.webhook_outbox(), GROUP, "-", "+", 1, consumername=self.consumer)
            if not pending:
                self._r.xgroup_delconsumer(keys.webhook_outbox(), GROUP, self.consumer)
        except RedisError as e:  # its entries (if any) are taken over by another deliverer after the idle time
            logger.info("webhook deliverer %s left its name in the group: %s", self.consumer, e)

    def step(self, senders: ThreadPoolExecutor, *, block_ms: int | None = None) -> int:
        """Hand due deliveries to `senders`, then fan out new (and abandoned) outbox entries, waiting for
        new ones up to `block_ms` (default: until the next delivery is due, within [50 ms, 1 s]). How
        many outbox entries it fanned out."""
        if not self._group_ready:
            self._ensure_group()
            self._group_ready = True
        claimed, wait_ms = self._claim_due_deliveries()
        for delivery_id in claimed:
            senders.submit(self._attempt_logged, delivery_id)
        return self.fan_out(block_ms=wait_ms if block_ms is None else block_ms)

    # --- outbox → deliveries -----------------------------------------------------------------------
    def _ensure_group(self) -> None:
        try:
            self._r.xgroup_create(keys.webhook_outbox(), GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def fan_out(self, *, block_ms: int) -> int:
        """Turn outbox entries into deliveries: a dead deliverer's first (looked for every few seconds),
        then new ones. How many entries."""
        entries: list = []
        if time.monotonic() >= self._next_reclaim:
            self._next_reclaim = time.monotonic() + self._reclaim_every_s
            _, abandoned, *_ = self._r.xautoclaim(
                keys.webhook_outbox(), GROUP, self.consumer, self._outbox_claim_idle_ms, start_id="0-0", count=BATCH
            )
            entries = list(abandoned)
            if len(entries) == BATCH:  # more may be waiting: look again on the next loop
                self._next_reclaim = 0.0
        if not entries:
            read = self._r.xreadgroup(GROUP, self.consumer, {keys.webhook_outbox(): ">"}, count=BATCH, block=block_ms)
            entries = [entry for _, stream_entries in read for entry in stream_entries]
        entries = [(entry_id, fields or {}) for entry_id, fields in entries]
        for entry_id, fields in self._watched(entries):
            self._fan_out_entry(entry_id, fields)
        return len(entries)

    def _watched(self, entries: list[tuple[str, dict[str, str]]]) -> list[tuple[str, dict[str, str]]]:
        """The entries whose tenant has an endpoint; the others are acknowledged, in one script call."""
        if not entries:
            return []
        with_tenant = [(entry_id, f["tenant_id"]) for entry_id, f in entries if f.get("tenant_id")]
        without = [entry_id for entry_id, f in entries if not f.get("tenant_id")]
        watched = set(self._ack_unwatched(
            keys=[keys.webhook_outbox(), *(keys.tenant_webhooks(t) for _, t in with_tenant)],
            args=[GROUP, *(entry_id for entry_id, _ in with_tenant), *without],
        ))
        return [(entry_id, fields) for entry_id, fields in entries if entry_id in watched]

    def _fan_out_entry(self, entry_id: str, fields: dict[str, str]) -> None:
        event_type, tenant_id = fields.get("type", ""), fields.get("tenant_id", "")
        endpoints = [e for e in self._endpoints.list(tenant_id) if e.wants(event_type)] if tenant_id else []
        event_id = event_id_for(entry_id)
        try:
            data = json.loads(fields.get("data") or "{}")
        except json.JSONDecodeError:
            data = {}
        body = event_payload(event_id, event_type, int(fields.get("created_at") or time.time()), data)
        _schedule(self._fan_out, GROUP, entry_id, event_id, event_type, body, endpoints)

    # --- deliveries → POSTs ------------------------------------------------------------------------
    def _claim_due_deliveries(self) -> tuple[list[str], int]:
        """Claim the deliveries due now (one read of the due set's head) and say how long the loop may
        wait for outbox entries: until the next one is due, within [50 ms, 1 s]."""
        head = self._r.zrange(keys.webhook_due(), 0, BATCH - 1, withscores=True)
        now_ms = _now_ms()
        claimed: list[str] = []
        wait_ms = MAX_BLOCK_MS
        for delivery_id, score in head:
            if score > now_ms:  # the head is in due order: nothing after this one is due
                wait_ms = int(score) - now_ms
                break
            with self._lock:
                if len(self._in_flight) >= 4 * SENDERS:
                    wait_ms = MIN_BLOCK_MS  # due deliveries left for the next loop
                    break
            if self._claim_due(keys=[keys.webhook_due()], args=[delivery_id, self._claim_ms]) == 1:
                with self._lock:
                    self._in_flight.add(delivery_id)
                claimed.append(delivery_id)
        else:
            if len(head) == BATCH:  # a full batch was due: more may be
                wait_ms = MIN_BLOCK_MS
        return claimed, max(MIN_BLOCK_MS, min(MAX_BLOCK_MS, wait_ms))

    def _attempt_logged(self, delivery_id: str) -> None:
        try:
            self.attempt(delivery_id)
        except Exception:  # a sender thread must not die silently; the claim runs out and it is retried
            logger.exception("webhook delivery %s failed unexpectedly; it will be retried", delivery_id)
        finally:
            with self._lock:
                self._in_flight.discard(delivery_id)

    def attempt(self, delivery_id: str) -> PostResult | None:
        """One attempt of a claimed delivery, then its settlement: done, rescheduled or given up."""
        record = self._r.hgetall(keys.webhook_delivery(delivery_id))
        try:
            target = self._endpoints.get(None, record["endpoint_id"]) if record else None
        except NotFound:  # the endpoint was deleted: its deliveries go with it
            target = None
        if target is None:
            self._drop(delivery_id)
            return None
        body = record["body"].encode()
        timestamp = int(time.time())
        headers = {
            "webhook-id": record["event_id"],
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(target.secret, record["event_id"], timestamp, body),
            "User-Agent": _USER_AGENT,
        }
        result = post(target.url, body, headers, timeout_s=self._settings.webhook_timeout_s,
                      allow_private=self._settings.webhook_allow_private)
        self._settle(delivery_id, record, result)
        return result

    def _drop(self, delivery_id: str) -> None:
        with self._r.pipeline(transaction=True) as pipe:
            pipe.delete(keys.webhook_delivery(delivery_id))
            pipe.zrem(keys.webhook_due(), delivery_id)
            pipe.execute()

    def _settle(self, delivery_id: str, record: dict[str, str], result: PostResult) -> None:
        s = self._settings
        attempts = int(record.get("attempts", "0")) + 1
        now_ms = _now_ms()
        delay_s = backoff_s(attempts, base_s=s.webhook_backoff_base_s, max_s=s.webhook_backoff_max_s)
        next_ms = now_ms + int(delay_s * 1000)
        if result.delivered:
            outcome = "delivered"
        elif next_ms - int(record.get("first_at_ms", now_ms)) > s.webhook_retry_window_s * 1000:
            outcome = "failed"  # the next attempt would fall outside the retry window: give up
        else:
            outcome = "retrying"
        entry = {
            "id": f"{record['event_id']}.{attempts}",
            "object": "webhook.delivery_attempt",
            "event_id": record["event_id"],
            "event_type": record.get("type"),
            "attempt": attempts,
            "status_code": result.status_code,
            "error": result.error,
            "duration_ms": result.duration_ms,
            "created_at": now_ms // 1000,
            "outcome": outcome,
            "next_attempt_at": next_ms // 1000 if outcome == "retrying" else None,
        }
        log_key = keys.webhook_log(record["endpoint_id"])
        with self._r.pipeline(transaction=True) as pipe:
            if outcome == "retrying":
                pipe.hset(keys.webhook_delivery(delivery_id), "attempts", attempts)
                pipe.zadd(keys.webhook_due(), {delivery_id: next_ms})
            else:
                pipe.delete(keys.webhook_delivery(delivery_id))
                pipe.zrem(keys.webhook_due(), delivery_id)
            pipe.lpush(log_key, json.dumps(entry))
            pipe.ltrim(log_key, 0, s.webhook_log_max_len - 1)
            pipe.execute()
        if outcome != "delivered":
            logger.info("webhook %s to %s: attempt %d %s (%s)", record["event_id"], record["endpoint_id"],
                        attempts, outcome, result.error)
