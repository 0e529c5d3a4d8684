"""Lua source of the rank sweeps' atomic steps (fleet.sweeps): create a whole sweep, record a child's
candidate, claim, renew and end the exactly-once finish. Conventions as in fleet.queue_scripts (the
prelude's fencing, outcomes as the first element of the reply, the Redis server's clock)."""

from __future__ import annotations

from fleet import keys
from fleet.queue_scripts import IDEMPOTENCY, PRELUDE

__all__ = ["CREATE_SWEEP", "SUBMIT_CANDIDATE", "CLAIM_FINISH", "RENEW_FINISH", "END_PARENT"]

# KEYS: parent job, tenant_jobs, idempotency, job_seq, sweep, active_sweeps, parent's job_events, then
#       each child's job key, then each child's job_events
# ARGV: parent_id, tenant_id, use_idempotency ('0'|'1'), body_sha256, ttl_s, events_max_len, now_s,
#       n_children, the parent's first event's message, n (the parent's field/value count), field, value, ...,
#       then per child: child_id, n, field, value, ...
# The whole sweep in one step: the parent (running, with every child listed), the sweep hash and each child
# queued, or nothing. A process dying around this call leaves all of it or none (a retry with the same
# Idempotency-Key finds all of it). The Idempotency-Key works as for CREATE (a replay gets {'existing',
# job_id}, another body {'conflict', job_id}); the tenant's max_queued_jobs quota must take every child
# ({'quota', limit, queued now}; {'never', limit} when the sweep alone is larger), and a child over its
# nominal quota plus borrowing limit gets {'too_large', gpus, nominal, borrowing limit}, as CREATE.
CREATE_SWEEP = (
    PRELUDE
    + IDEMPOTENCY
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'existing', ARGV[1]} end
local replay = replayed_key()
if replay then return replay end
local tenant, n = ARGV[2], tonumber(ARGV[8])
local pos = 10
local function fields_at()  -- the field/value list at `pos`, its count first
  local count = tonumber(ARGV[pos])
  local out = {}
  for i = pos + 1, pos + count do out[#out + 1] = ARGV[i] end
  pos = pos + count + 1
  return out
end
local parent_fields = fields_at()
local children = {}
for i = 1, n do
  local id = ARGV[pos]
  pos = pos + 1
  children[i] = {id = id, fields = fields_at()}
end
local max_queued = quota_field(tenant, 'max_queued_jobs')
if max_queued and n > max_queued then return {'never', int(max_queued)} end
if max_queued and queued_jobs(tenant) + n > max_queued then
  return {'quota', int(max_queued), int(queued_jobs(tenant))}
end
local q = quota_of(tenant)
for i = 1, #children[1].fields - 1, 2 do
  if children[1].fields[i] == 'gpus' and never_fits(q, tonumber(children[1].fields[i + 1])) then
    return {'too_large', children[1].fields[i + 1], int(q.nominal), int(q.borrow)}
  end
end
local seq = redis.call('INCR', KEYS[4])
redis.call('HSET', KEYS[1], 'seq', seq, unpack(parent_fields))
redis.call('ZADD', KEYS[2], seq, ARGV[1])
remember_key()
redis.call('HSET', KEYS[5], 'tenant_id', tenant, 'expected', n, 'state', 'running')
redis.call('SADD', KEYS[6], ARGV[1])
emit_job('running', tenant, ARGV[1])
redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[6], '*', 'created_at', ARGV[7], 'level', 'info',
           'message', ARGV[9], 'type', 'message')
local now = now_ms()
for i, child in ipairs(children) do
  local child_seq = redis.call('INCR', KEYS[4])
  redis.call('HSET', KEYS[7 + i], 'seq', child_seq, 'queue_seq', child_seq, unpack(child.fields))
  redis.call('ZADD', KEYS[2], child_seq, child.id)
  enqueue(tenant, child.id, false, now)
  emit_job('queued', tenant, child.id)
  redis.call('XADD', KEYS[7 + n + i], 'MAXLEN', '~', ARGV[6], '*', 'created_at', ARGV[7], 'level', 'info',
             'message', 'Created fine-tuning job: ' .. child.id .. ' (a child of rank sweep ' .. ARGV[1] .. ')',
             'type', 'message')
end
return {'created', ARGV[1], seq}
"""
)

# KEYS: child job, sweep.  ARGV: attempt, token, child_id, candidate_json
# A child's candidate, recorded only while its claim holds and no cancel is pending (publish_check).
SUBMIT_CANDIDATE = (
    PRELUDE
    + """
local refused = publish_check(KEYS[1], ARGV[1], ARGV[2])
if refused then return refused end
if redis.call('EXISTS', KEYS[2]) == 0 then return {'no_sweep'} end
redis.call('HSET', KEYS[2], 'candidate:' .. ARGV[3], ARGV[4])
return {'ok'}
"""
)

# KEYS: sweep, parent job, every child job.  ARGV: claim_token, finish_lease_ms
# The exactly-once step. {'finish', attempt} to one caller once every child is terminal (a child whose
# record is gone counts as ended) and no live finisher holds the sweep; the parent gets that attempt and
# the token, so the caller holds its Fence. Otherwise {'waiting', why}, {'busy'} or {'none'} (no sweep).
CLAIM_FINISH = (
    PRELUDE
    + f"local HANDED_OVER = '{keys.sweeps_handed_over()}'\n"
    + """
local v = redis.call('HMGET', KEYS[1], 'state', 'expected', 'finisher_expires_ms')
if not v[1] then return {'none'} end
if #KEYS - 2 ~= tonumber(v[2]) then return {'waiting', 'children still being created'} end
for i = 3, #KEYS do
  local st = redis.call('HGET', KEYS[i], 'status')
  if st and st ~= 'succeeded' and st ~= 'failed' and st ~= 'cancelled' then return {'waiting', job_id_of(KEYS[i])} end
end
local now = now_ms()
if v[1] == 'finishing' and tonumber(v[3]) > now then return {'busy'} end
if redis.call('HGET', KEYS[2], 'status') ~= 'running' then return {'none'} end
local attempt = redis.call('HINCRBY', KEYS[2], 'attempt', 1)
redis.call('HSET', KEYS[2], 'claim_token', ARGV[1], 'updated_at', sec(now))
redis.call('HSET', KEYS[1], 'state', 'finishing', 'finisher_expires_ms', int(now + tonumber(ARGV[2])))
redis.call('SADD', HANDED_OVER, job_id_of(KEYS[2]))  -- should this finisher die, a dispatcher's tick takes over
return {'finish', attempt}
"""
)

# KEYS: sweep, parent job.  ARGV: attempt, token, finish_lease_ms
# A live finisher extends its claim (its heartbeat while it downloads and uploads the adapter).
RENEW_FINISH = (
    PRELUDE
    + """
local refused = fence_check(KEYS[2], ARGV[1], ARGV[2])
if refused then return refused end
if redis.call('HGET', KEYS[1], 'state') ~= 'finishing' then return {'none'} end
redis.call('HSET', KEYS[1], 'finisher_expires_ms', int(now_ms() + tonumber(ARGV[3])))
return {'ok'}
"""
)

# KEYS: parent job, sweep, active_sweeps, retention indexes (3)
# ARGV: parent_id, attempt, token, status (succeeded|failed|cancelled), field, value, ...
# Ends the parent (fenced by the finisher's claim) and forgets the sweep's coordination state.
END_PARENT = (
    PRELUDE
    + f"local HANDED_OVER = '{keys.sweeps_handed_over()}'\n"
    + """
local refused = fence_check(KEYS[1], ARGV[2], ARGV[3])
if refused then return refused end
local now = sec(now_ms())
local tenant = redis.call('HGET', KEYS[1], 'tenant_id')
redis.call('HDEL', KEYS[1], 'control', 'claim_token')
redis.call('HSET', KEYS[1], 'status', ARGV[4], 'finished_at', now, 'updated_at', now, unpack(tail(5)))
index_finished(KEYS[4], KEYS[5], KEYS[6], ARGV[1], now)
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('SREM', HANDED_OVER, ARGV[1])
emit_job(ARGV[4], tenant, ARGV[1])
return {'ok'}
"""
)
