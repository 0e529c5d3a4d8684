"""The cluster's capacity: its nodes and their accelerators, as dispatchers read them from Ray."""

from __future__ import annotations

import redis
from pydantic import BaseModel, Field

from fleet import keys
from fleet.settings import check_redis_client

__all__ = ["NodeCapacity", "CapacityStore"]


class NodeCapacity(BaseModel):
    """One Ray node: its accelerators (`Settings.accelerator_resource`) and whether Ray sees it alive."""

    node_id: str
    address: str = ""
    gpus: int = Field(ge=0)
    alive: bool = True


# KEYS: nodes hash, capacity hash, wakeup.  ARGV: node_id, node_json, gpus ('0' when dead), ... (triples)
# Replaces the node table and the total in one step; more GPUs than before wake an idle dispatcher.
# Returns the ids of nodes that were alive and are now dead or gone.
_RECORD_NODES = """
local before = redis.call('HGETALL', KEYS[1])
local alive_before = {}
for i = 1, #before, 2 do
  local node = cjson.decode(before[i + 1])
  if node['alive'] then alive_before[before[i]] = true end
end
redis.call('DEL', KEYS[1])
local total = 0
local alive_now = {}
for i = 1, #ARGV, 3 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  if cjson.decode(ARGV[i + 1])['alive'] then alive_now[ARGV[i]] = true end
  total = total + tonumber(ARGV[i + 2])
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
    """The node table in Redis. Dispatchers call `record_nodes` every few seconds; the scheduler's Lua
    reads `total_gpus` from the capacity hash. Until a first report the capacity is unknown, and
    admission is then bounded by quotas only (a deployment with no dispatcher reading Ray)."""

    def __init__(self, client: redis.Redis) -> None:
        check_redis_client(client)
        self.redis = client
        self._record = client.register_script(_RECORD_NODES)

    def record_nodes(self, nodes: list[NodeCapacity]) -> list[str]:
        """Replace the node table atomically and set the total to the alive nodes' accelerators.

        Returns the ids of nodes that were alive at the last report and are now dead or absent: their
        jobs' Ray work fails and is handed back by the dispatcher's infrastructure-fault path.
        """
        args: list[str] = []
        for node in nodes:
            args += [node.node_id, node.model_dump_json(), str(node.gpus if node.alive else 0)]
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
