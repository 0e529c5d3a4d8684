"""The cluster's capacity: its nodes and their accelerators, as dispatchers read them from Ray."""

from __future__ import annotations

import redis
from pydantic import BaseModel, Field

from fleet import keys
from fleet.settings import check_redis_client

__all__ = ["NODE_EXPIRY_MS", "NodeCapacity", "CapacityStore"]


class NodeCapacity(BaseModel):
    """One Ray node: its accelerators (`Settings.accelerator_resource`) and whether Ray sees it alive.

    `source` names the Ray cluster that reported it (its GCS address) and `reported_at_ms` when (Redis
    clock); both are stamped by `CapacityStore.record_nodes`."""

    node_id: str
    address: str = ""
    gpus: int = Field(ge=0)
    alive: bool = True
    source: str = ""
    reported_at_ms: int = 0


# Unreported this long, a node leaves the table: 15 reports missed at the capacity watch's 2 s.
NODE_EXPIRY_MS = 30_000

# KEYS: nodes hash, capacity hash, wakeup.  ARGV: source, expiry_ms, then (node_id, node_json) pairs.
# Replaces this source's nodes (one it no longer lists is gone), drops other sources' nodes unreported
# for more than expiry_ms, stamps each reported node with its source and the Redis clock, and sets the
# total to the alive nodes' GPUs, all in one step; more GPUs than before wake an idle dispatcher.
# Returns the ids of nodes that were alive and are now dead or gone.
_RECORD_NODES = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local source, expiry_ms = ARGV[1], tonumber(ARGV[2])
local before = redis.call('HGETALL', KEYS[1])
local alive_before = {}
for i = 1, #before, 2 do
  local node = cjson.decode(before[i + 1])
  if node['alive'] then alive_before[before[i]] = true end
  if (node['source'] or '') == source or now - (tonumber(node['reported_at_ms']) or 0) > expiry_ms then
    redis.call('HDEL', KEYS[1], before[i])
  end
end
for i = 3, #ARGV, 2 do
  local node = cjson.decode(ARGV[i + 1])
  node['source'] = source
  node['reported_at_ms'] = now
  redis.call('HSET', KEYS[1], ARGV[i], cjson.encode(node))
end
local total = 0
local alive_now = {}
local after = redis.call('HGETALL', KEYS[1])
for i = 1, #after, 2 do
  local node = cjson.decode(after[i + 1])
  if node['alive'] then
    alive_now[after[i]] = true
    total = total + tonumber(node['gpus'])
  end
end
local before_total = tonumber(redis.call('HGET', KEYS[2], 'total_gpus') or '0')
redis.call('HSET', KEYS[2], 'total_gpus', total)
if total > before_total then
  redis.call('LPUSH', KEYS[3], 'capacity')
  redis.call('LTRIM', KEYS[3], 0, 63)
end
local lost = {}
for id, _ in pairs(alive_before) do
  if not alive_now[id] then lost[#lost + 1] = id end
end
table.sort(lost)
return lost
"""


class CapacityStore:
    """The node table in Redis. Dispatchers call `record_nodes` every few seconds, each for its Ray
    cluster; the scheduler's Lua reads `total_gpus` (summed over every cluster) from the capacity hash.
    Until a first report the capacity is unknown, and admission is then bounded by quotas only (a
    deployment with no dispatcher reading Ray)."""

    def __init__(self, client: redis.Redis) -> None:
        check_redis_client(client)
        self.redis = client
        self._record = client.register_script(_RECORD_NODES)

    def record_nodes(self, nodes: list[NodeCapacity], *, source: str = "",
                     expiry_ms: int = NODE_EXPIRY_MS) -> list[str]:
        """Record what the Ray cluster `source` (its GCS address) reports, atomically: its nodes in the
        table are replaced by `nodes`; other sources' nodes stay unless none was reported for more than
        `expiry_ms` (their cluster's dispatchers are gone); the total is the alive nodes' accelerators.

        Several dispatchers may share one Ray cluster (same source: the last report wins) or each run
        its own (each source keeps its own nodes). Returns the ids of nodes that were alive at the last
        report and are now dead, absent from their source's report or expired: their jobs' Ray work
        fails and is handed back by the dispatcher's infrastructure-fault path.
        """
        args: list[str] = [source, str(expiry_ms)]
        for node in nodes:
            args += [node.node_id, node.model_dump_json()]
        return list(self._record(keys=[keys.capacity_nodes(), keys.capacity(), keys.wakeup()], args=args))

    def total_gpus(self) -> int:
        """Accelerators on alive nodes at the last report; 0 before any report (see `is_known`)."""
        return int(self.redis.hget(keys.capacity(), "total_gpus") or 0)

    def is_known(self) -> bool:
        """Whether any dispatcher has reported the nodes yet."""
        return self.redis.hexists(keys.capacity(), "total_gpus")

    def nodes(self) -> list[NodeCapacity]:
        """The node table as last reported, sorted by node id."""
        raw = self.redis.hgetall(keys.capacity_nodes())
        return [NodeCapacity.model_validate_json(raw[node_id]) for node_id in sorted(raw)]
