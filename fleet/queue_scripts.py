"""Lua source of the atomic job-state transitions that fleet.queue, fleet.leases and fleet.registry register.

Each script checks the job's current state (and, for worker calls, the fence: attempt number and claim
token, checked by the prelude's `fence_check` and nowhere else) and applies one move of
`fleet.jobs.ALLOWED_TRANSITIONS` in a single atomic step (tests/fleet/test_fleet_transitions.py drives
every script from every state and checks both ways). Keys come in as KEYS (built by fleet.keys);
scripts return a table whose first element names the outcome; `fleet.fencing.raise_for_refusal` maps
the refusals to exceptions. Times come from the Redis server clock so that every dispatcher agrees on
lease expiry.
"""

from __future__ import annotations

from fleet import keys
from fleet.sched_scripts import ADMIT, FUNCTIONS

# Webhook events (fleet.webhooks) go to one outbox stream in the same script as the state change, so a
# change and its event are written together or not at all. The outbox key is a constant written into
# the prelude (from fleet.keys), so the scripts' callers pass the same KEYS as before.
OUTBOX_MAX_LEN = 100_000  # a safety cap: deliverers delete entries once fanned out

PRELUDE = f"""
local OUTBOX = '{keys.webhook_outbox()}'
local JOB_KEY_PREFIX = '{keys.job("")}'
local OUTBOX_MAX_LEN = '{OUTBOX_MAX_LEN}'
local QUOTA_PREFIX = '{keys.quota("")}'
local DEFAULT_QUOTA = '{keys.default_quota()}'
local STATUS_COUNTS = '{keys.job_status_counts()}'
""" + """
-- The clock: the Redis server's, unless the script set CLOCK (a simulated clock, bench/sched_sim.py).
local CLOCK = nil
local function now_ms()
  if CLOCK then return CLOCK end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function clock_arg(s) if s and s ~= '' then return tonumber(s) end return nil end
local function int(n) return string.format('%d', n) end
local function sec(ms) return int(math.floor(ms / 1000)) end
-- The one fencing check: nil when the job is running under this attempt and claim token, else the
-- refusal every fenced script returns unchanged: {'fenced', status, current attempt}.
local function fence_check(job_key, attempt, token)
  local v = redis.call('HMGET', job_key, 'status', 'attempt', 'claim_token')
  if v[1] ~= 'running' or v[2] ~= attempt or v[3] ~= token then return {'fenced', v[1] or '', v[2] or ''} end
  return nil
end
-- Whether the job's adapter version is committed (or already ready): the point of no return, after
-- which the job can only end succeeded with that version.
local function committed(publication_key)
  local state = redis.call('HGET', publication_key, 'state')
  return state == 'committed' or state == 'ready'
end
-- A job just became terminal: index it for fleet.retention (records, checkpoints, uploads).
local function index_finished(jobs_index, checkpoints_index, uploads_index, job_id, now_s)
  redis.call('ZADD', jobs_index, now_s, job_id)
  redis.call('ZADD', checkpoints_index, now_s, job_id)
  redis.call('ZADD', uploads_index, now_s, job_id)
end
-- fence_check, then refuse ('cancel_requested') while a cancel is pending: a publishing step's guard.
local function publish_check(job_key, attempt, token)
  local refused = fence_check(job_key, attempt, token)
  if refused then return refused end
  if redis.call('HGET', job_key, 'control') == 'cancel' then return {'cancel_requested'} end
  return nil
end
-- Append a webhook event to the outbox: its type, tenant and `data` object (fleet.webhook_delivery).
local function emit(event_type, tenant, data)
  redis.call('XADD', OUTBOX, 'MAXLEN', '~', OUTBOX_MAX_LEN, '*', 'type', event_type,
             'tenant_id', tenant, 'created_at', sec(now_ms()), 'data', cjson.encode(data))
end
local function emit_job(status, tenant, job_id)
  redis.call('HINCRBY', STATUS_COUNTS, status, 1)  -- every status change passes here (metrics)
  emit('fine_tuning.job.' .. status, tenant, {id = job_id})
end
-- A tenant's quota field as a number, nil when unset (no limit): its own quota hash, else the default.
local function quota_field(tenant, field)
  local key = QUOTA_PREFIX .. tenant
  if redis.call('EXISTS', key) == 0 then key = DEFAULT_QUOTA end
  local v = redis.call('HGET', key, field)
  if v then return tonumber(v) end
  return nil
end
local function job_id_of(job_key) return string.sub(job_key, #JOB_KEY_PREFIX + 1) end
local function tail(from)
  local out = {}
  for i = from, #ARGV do out[#out + 1] = ARGV[i] end
  return out
end
""" + FUNCTIONS

# KEYS: job, tenant_jobs, idempotency, job_seq, queue, job_events
# ARGV: job_id, tenant_id, use_idempotency ('0'|'1'), body_sha256, ttl_s, clock_ms ('' = Redis's),
#       events_max_len, created_at (s), field, value, ...   (created queued, at its place: priority, then seq)
# Returns {'created', job_id, seq}; the job's first event ("Created fine-tuning job: ...") is written here
# too, so a create is one round trip.
# The client draws the job id, so a retry of this script (its reply lost, the client retried it) carries
# the same id: the job already exists and is returned, never created or queued twice. A tenant at its
# max_queued_jobs quota (its parked jobs count) gets {'quota', 'max_queued_jobs', limit}, and a job over
# the tenant's nominal quota plus its borrowing limit (it could never start) gets {'too_large', gpus,
# nominal, borrowing limit}: nothing is created (a replay of an Idempotency-Key still answers with its job).
# The Idempotency-Key of a create (KEYS[3] when ARGV[3] is '1'; ARGV[4] the body's sha256, ARGV[5] the
# key's lifetime in seconds, ARGV[1] the job created): CREATE and fleet.sweep_scripts.CREATE_SWEEP both
# answer a replay with {'existing', job} (the same body) or {'conflict', job} (another body).
IDEMPOTENCY = """
local function replayed_key()
  if ARGV[3] ~= '1' then return nil end
  local seen = redis.call('HMGET', KEYS[3], 'job_id', 'body_sha256')
  if not seen[1] then return nil end
  if seen[2] == ARGV[4] then return {'existing', seen[1]} end
  return {'conflict', seen[1]}
end
local function remember_key()
  if ARGV[3] ~= '1' then return end
  redis.call('HSET', KEYS[3], 'job_id', ARGV[1], 'body_sha256', ARGV[4])
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[5]))
end
"""

CREATE = (
    PRELUDE
    + IDEMPOTENCY
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'existing', ARGV[1]} end
local replay = replayed_key()
if replay then return replay end
local max_queued = quota_field(ARGV[2], 'max_queued_jobs')
if max_queued and queued_jobs(ARGV[2]) >= max_queued then
  return {'quota', 'max_queued_jobs', int(max_queued)}
end
local q = quota_of(ARGV[2])
for i = 9, #ARGV - 1, 2 do
  if ARGV[i] == 'gpus' and never_fits(q, tonumber(ARGV[i + 1])) then
    return {'too_large', ARGV[i + 1], int(q.nominal), int(q.borrow)}
  end
end
CLOCK = clock_arg(ARGV[6])
local seq = redis.call('INCR', KEYS[4])
redis.call('HSET', KEYS[1], 'seq', seq, 'queue_seq', seq, unpack(tail(9)))
redis.call('ZADD', KEYS[2], seq, ARGV[1])
remember_key()
enqueue(ARGV[2], ARGV[1], false, now_ms())
emit_job('queued', ARGV[2], ARGV[1])
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[7], '*', 'created_at', ARGV[8], 'level', 'info',
           'message', 'Created fine-tuning job: ' .. ARGV[1], 'type', 'message')
return {'created', ARGV[1], seq}
"""
)

# KEYS: job, queue, queue_tenants, wakeup (unused), publication, retention indexes (3: fleet.keys.retention_indexes)
# ARGV: job_id, tenant_id (another tenant's job: missing), clock_ms ('' = Redis's)
# Once the job's version is committed the job completes: 'completing', nothing changed.
CANCEL = (
    PRELUDE
    + """
local v = redis.call('HMGET', KEYS[1], 'status', 'tenant_id')
if not v[1] or v[2] ~= ARGV[2] then return {'missing'} end
local st = v[1]
CLOCK = clock_arg(ARGV[3])
local now = sec(now_ms())
if (st == 'queued' or st == 'paused' or st == 'running') and committed(KEYS[5]) then return {'completing'} end
if st == 'queued' or st == 'paused' then
  if st == 'queued' then unqueue(ARGV[2], ARGV[1], now_ms()) end
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', now, 'updated_at', now)
  redis.call('HDEL', KEYS[1], 'control')
  index_finished(KEYS[6], KEYS[7], KEYS[8], ARGV[1], now)
  emit_job('cancelled', ARGV[2], ARGV[1])
  return {'cancelled'}
elseif st == 'running' then
  redis.call('HSET', KEYS[1], 'control', 'cancel', 'updated_at', now)
  return {'requested'}
elseif st == 'cancelled' then
  return {'noop'}
end
return {'invalid', st}
"""
)

# KEYS: job, queue, queue_tenants, wakeup (unused), publication.  ARGV: job_id, tenant_id, clock_ms
# Once the job's version is committed the job completes: 'completing', nothing changed. Pausing a job
# being preempted replaces the preemption (the job stops either way; its GPUs still count as coming).
PAUSE = (
    PRELUDE
    + """
local v = redis.call('HMGET', KEYS[1], 'status', 'tenant_id', 'control')
if not v[1] or v[2] ~= ARGV[2] then return {'missing'} end
local st = v[1]
CLOCK = clock_arg(ARGV[3])
local now = sec(now_ms())
if (st == 'queued' or st == 'running') and committed(KEYS[5]) then return {'completing'} end
if st == 'queued' then
  unqueue(ARGV[2], ARGV[1], now_ms())
  redis.call('HSET', KEYS[1], 'status', 'paused', 'updated_at', now)
  emit_job('paused', ARGV[2], ARGV[1])
  return {'paused'}
elseif st == 'running' then
  if v[3] == 'cancel' then return {'invalid', 'cancelling'} end
  redis.call('HSET', KEYS[1], 'control', 'pause', 'updated_at', now)
  return {'requested'}
elseif st == 'paused' then
  return {'noop'}
end
return {'invalid', st}
"""
)

# KEYS: job, queue, queue_tenants, wakeup, publication (unused).  ARGV: job_id, tenant_id, clock_ms
# A resumed job goes to the back of its tenant's queue (within its priority). A tenant at its
# max_queued_jobs quota (parked jobs count) gets {'quota', 'max_queued_jobs', limit}, nothing changed.
RESUME = (
    PRELUDE
    + """
local v = redis.call('HMGET', KEYS[1], 'status', 'tenant_id', 'control')
if not v[1] or v[2] ~= ARGV[2] then return {'missing'} end
local st = v[1]
CLOCK = clock_arg(ARGV[3])
local now = now_ms()
if st == 'paused' then
  local max_queued = quota_field(ARGV[2], 'max_queued_jobs')
  if max_queued and queued_jobs(ARGV[2]) >= max_queued then
    return {'quota', 'max_queued_jobs', int(max_queued)}
  end
  redis.call('HSET', KEYS[1], 'status', 'queued', 'updated_at', sec(now))
  redis.call('HDEL', KEYS[1], 'control')
  enqueue(ARGV[2], ARGV[1], true, now)
  emit_job('queued', ARGV[2], ARGV[1])
  return {'queued'}
elseif st == 'running' and v[3] == 'pause' then
  if redis.call('HEXISTS', KEYS[1], 'preempting_gpus') == 1 then  -- it was being preempted: it still is
    redis.call('HSET', KEYS[1], 'control', 'preempt')
  else
    redis.call('HDEL', KEYS[1], 'control')
  end
  return {'unpaused'}
elseif st == 'running' or st == 'queued' then
  return {'noop'}
end
return {'invalid', st}
"""
)

# The scheduler's decision and the claim that applies it, in one step (fleet.sched_scripts.ADMIT).
# KEYS: none (a single Redis: the scheduler reads the index and the chosen tenant's keys by name)
# ARGV: worker_id, lease_ms, claim_token (fresh, random), clock_ms ('' = Redis's)
CLAIM = PRELUDE + ADMIT

# KEYS: job, leases.  ARGV: job_id, attempt, token, lease_ms
RENEW = (
    PRELUDE
    + """
local refused = fence_check(KEYS[1], ARGV[2], ARGV[3])
if refused then return refused end
local expires = now_ms() + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'lease_expires_at_ms', int(expires))
redis.call('ZADD', KEYS[2], expires, ARGV[1])
return {'ok', int(expires), redis.call('HGET', KEYS[1], 'control') or ''}
"""
)

# KEYS: job.  ARGV: attempt, token   (the pending control request of a fenced attempt)
CONTROL = (
    PRELUDE
    + """
local refused = fence_check(KEYS[1], ARGV[1], ARGV[2])
if refused then return refused end
return {'ok', redis.call('HGET', KEYS[1], 'control') or ''}
"""
)

# KEYS: job.  ARGV: attempt, token, field, value, ...   (fenced write of worker-reported fields)
FENCED_UPDATE = (
    PRELUDE
    + """
local refused = fence_check(KEYS[1], ARGV[1], ARGV[2])
if refused then return refused end
redis.call('HSET', KEYS[1], 'updated_at', sec(now_ms()), unpack(tail(3)))
return {'ok', redis.call('HGET', KEYS[1], 'control') or ''}
"""
)

# KEYS: job, checkpoints.  ARGV: attempt, token, step, checkpoint_json
# A new step is progress: the job's count of lost workers (lease_expirations, which EXPIRE_LEASE checks
# against max_attempts) starts again from 0, so outages spread over a long job never add up to a failure.
CHECKPOINT = (
    PRELUDE
    + """
local refused = fence_check(KEYS[1], ARGV[1], ARGV[2])
if refused then return refused end
if redis.call('HSET', KEYS[2], ARGV[3], ARGV[4]) == 1 then  -- a new step, not a retried write
  redis.call('HSET', KEYS[1], 'lease_expirations', 0)
  local job_id = job_id_of(KEYS[1])
  emit('fine_tuning.job.checkpoint.created', redis.call('HGET', KEYS[1], 'tenant_id'),
       {id = job_id, step = tonumber(ARGV[3]),
        checkpoint_id = 'ftckpt-' .. string.gsub(job_id, '^ftjob%-', '') .. '-' .. ARGV[3]})
end
return {'ok'}
"""
)

# KEYS: job, leases, running, queue, queue_tenants, wakeup, publication, retention indexes (3)
# ARGV: job_id, attempt, token, status (succeeded|failed|cancelled|paused|queued), clock_ms ('' = Redis's),
#       preempted ('0'|'1'), retry_after_ms ('0': none), field, value, ...
# The attempt's GPUs are released in the same step, whatever the status.
# A pending control request wins over what the worker asked for, as in EXPIRE_LEASE: handing back
# (queued) or pausing with a cancel pending cancels; handing back with a pause pending pauses.
# Succeeding with a cancel pending is refused ('cancel_requested'), changing nothing. Once the job's
# version is committed nothing but succeeding ends it: succeeded is granted whatever was requested, and
# any other status hands the job back (queued) for the next attempt to complete: at the BACK of its
# queue (completing failed, e.g. the object store is down: other jobs go first), with the reason in
# last_failure; only the first such hand-back is announced (event, webhook), so a completion that keeps
# failing does not flood them. Pausing with no pause pending (the tenant resumed before the worker
# stopped) is refused ('pause_withdrawn').
# A job handed back otherwise returns to its place in the queue. Handed back preempted (or with a
# preemption pending) it announces fine_tuning.job.preempted instead of queued; with retry_after_ms it
# is parked out of the queue until then (the tenant's other jobs go on) and returns to its place.
# Returns {'ok', status the job is now in, '1' when announced else '0', '1' when preempted else '0'}.
FINISH = (
    PRELUDE
    + """
local refused = fence_check(KEYS[1], ARGV[2], ARGV[3])
if refused then return refused end
CLOCK = clock_arg(ARGV[5])
local v = redis.call('HMGET', KEYS[1], 'tenant_id', 'control')
local tenant, control = v[1], v[2]
local st, fields = ARGV[4], tail(8)
local to_back, announce, preempted = false, true, false
if committed(KEYS[7]) then
  if st ~= 'succeeded' then  -- the next attempt completes it
    local why = 'attempt ' .. ARGV[2] .. ' ended ' .. st .. ' after its version was committed'
    for i = 1, #fields - 1, 2 do
      if fields[i] == 'error' then
        local ok, err = pcall(cjson.decode, fields[i + 1])
        if ok and type(err) == 'table' and err['message'] then why = why .. ': ' .. tostring(err['message']) end
      end
    end
    st, fields, to_back = 'queued', {'last_failure', why}, true
    announce = redis.call('HINCRBY', KEYS[1], 'completion_handbacks', 1) == 1
  end
else
  if st == 'succeeded' and control == 'cancel' then return {'cancel_requested'} end
  if st == 'paused' and control ~= 'pause' and control ~= 'cancel' then return {'pause_withdrawn'} end
  if (st == 'queued' or st == 'paused') and control == 'cancel' then
    st = 'cancelled'
  elseif st == 'queued' and control == 'pause' then
    st = 'paused'
  end
  preempted = st == 'queued' and (ARGV[6] == '1' or control == 'preempt')
end
local now = now_ms()
release(tenant, ARGV[1], now)
redis.call('HDEL', KEYS[1], 'worker_id', 'lease_expires_at_ms', 'control', 'claim_token')
redis.call('HSET', KEYS[1], 'status', st, 'updated_at', sec(now), unpack(fields))
if st == 'succeeded' or st == 'failed' or st == 'cancelled' then
  redis.call('HSET', KEYS[1], 'finished_at', sec(now))
  index_finished(KEYS[8], KEYS[9], KEYS[10], ARGV[1], sec(now))
elseif st == 'queued' then
  if tonumber(ARGV[7]) > 0 and not to_back then
    park(tenant, ARGV[1], now + tonumber(ARGV[7]))
  else
    enqueue(tenant, ARGV[1], to_back, now)
  end
end
if announce then
  if preempted then emit('fine_tuning.job.preempted', tenant, {id = ARGV[1]}) else emit_job(st, tenant, ARGV[1]) end
end
return {'ok', st, announce and '1' or '0', preempted and '1' or '0'}
"""
)

# KEYS: job, leases, running, queue, queue_tenants, wakeup, publication, retention indexes (3)
# ARGV: job_id, now_ms, max_attempts, expected_attempt, reason, failure_error_json, clock_ms ('' = Redis's)
# The attempt's GPUs are released in the same step, even when the job's record is gone ({'vanished'}:
# from what the running-job entry says it holds). A job going back to the queue returns to its
# place; a job whose version is committed always goes back (whatever the control request or the
# attempts lost): the next attempt completes it without training.
EXPIRE_LEASE = (
    PRELUDE
    + """
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return {'skip'} end
local v = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'tenant_id', 'control', 'lease_expirations')
if not v[1] then  -- the record is gone: its attempt's GPUs go back all the same
  local held = redis.call('HGET', HOLDERS, ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  if not held then return {'skip'} end
  CLOCK = clock_arg(ARGV[7])
  release(string.match(held, '^%d+ %d+ (.*)$'), ARGV[1], now_ms())
  return {'vanished'}
end
if v[1] ~= 'running' then redis.call('ZREM', KEYS[2], ARGV[1]); return {'skip'} end
if v[2] ~= ARGV[4] then return {'skip'} end
CLOCK = clock_arg(ARGV[7])
local now = now_ms()
release(v[3], ARGV[1], now)
local lost = tonumber(v[5] or '0') + 1
redis.call('HSET', KEYS[1], 'lease_expirations', lost, 'last_failure', ARGV[5], 'updated_at', sec(now))
redis.call('HDEL', KEYS[1], 'worker_id', 'lease_expires_at_ms', 'control', 'claim_token')
local new
if committed(KEYS[7]) then
  new = 'queued'
elseif v[4] == 'cancel' then
  new = 'cancelled'
elseif lost >= tonumber(ARGV[3]) then
  new = 'failed'
  redis.call('HSET', KEYS[1], 'error', ARGV[6])
elseif v[4] == 'pause' then
  new = 'paused'
else
  new = 'queued'
end
redis.call('HSET', KEYS[1], 'status', new)
if new == 'queued' then
  enqueue(v[3], ARGV[1], false, now)
elseif new == 'cancelled' or new == 'failed' then
  redis.call('HSET', KEYS[1], 'finished_at', sec(now))
  index_finished(KEYS[8], KEYS[9], KEYS[10], ARGV[1], sec(now))
end
emit_job(new, v[3], ARGV[1])
return {new, lost}
"""
)

# KEYS: job, publication, version_seq.  ARGV: job_id, attempt, token, name
# Reserve the job's adapter version number (fenced); a job that already reserved one gets it back.
RESERVE_VERSION = (
    PRELUDE
    + """
local refused = publish_check(KEYS[1], ARGV[2], ARGV[3])
if refused then return refused end
local pub = redis.call('HMGET', KEYS[2], 'name', 'version', 'state')
if pub[1] then return {'existing', pub[1], pub[2], pub[3]} end
local n = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[2], 'name', ARGV[4], 'version', n, 'state', 'uploading', 'attempt', ARGV[2])
return {'reserved', ARGV[4], n, 'uploading'}
"""
)

# KEYS: version_seq, import reservation.  ARGV: ttl_s
# Reserve a version number for one import. The import id is drawn by the client, so a retry of this
# script (its reply lost) gets the number it reserved back instead of spending another.
RESERVE_IMPORT_VERSION = """
local n = redis.call('GET', KEYS[2])
if n then return tonumber(n) end
n = redis.call('INCR', KEYS[1])
redis.call('SET', KEYS[2], n, 'EX', tonumber(ARGV[1]))
return n
"""

# KEYS: job, publication.  ARGV: attempt, token, manifest_json
# The first commit wins; later ones get the committed manifest back, so every writer writes the same bytes.
COMMIT_VERSION = (
    PRELUDE
    + """
local refused = publish_check(KEYS[1], ARGV[1], ARGV[2])
if refused then return refused end
local committed = redis.call('HGET', KEYS[2], 'manifest')
if committed then return {'committed', committed} end
redis.call('HSET', KEYS[2], 'state', 'committed', 'manifest', ARGV[3], 'attempt', ARGV[1])
return {'committed', ARGV[3]}
"""
)

# KEYS: job, events.  ARGV: attempt, token, max_len, field, value, ...
# A worker's event: appended only while its claim holds, so a stale attempt cannot write the job's log.
APPEND_EVENT = (
    PRELUDE
    + """
local refused = fence_check(KEYS[1], ARGV[1], ARGV[2])
if refused then return refused end
return {'ok', redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(tail(4)))}
"""
)

# KEYS: adapter_versions, adapters, publication (only for a job's version)
# ARGV: version, version record JSON, name, now_ms, tenant_id, ref ("<name>:v<N>"), job_id ('' for an import)
# A version becomes listed (ready) once; the first time, adapter.version.published goes to the outbox.
READY_VERSION = (
    PRELUDE
    + """
local created = redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], 'NX', ARGV[4], ARGV[3])
if KEYS[3] then redis.call('HSET', KEYS[3], 'state', 'ready') end
if created == 1 then
  local data = {id = ARGV[6]}
  if ARGV[7] ~= '' then data['job_id'] = ARGV[7] end
  emit('adapter.version.published', ARGV[5], data)
end
return created
"""
)

# KEYS: none.  ARGV: clock_ms ('' = Redis's), tenant_id, ...  (none: every tenant queued, holding GPUs or
# with jobs set aside as never fitting its quota)
# Re-index tenants after their quota, the default quota or the half-life changed.
REINDEX = (
    PRELUDE
    + """
CLOCK = clock_arg(ARGV[1])
local now = now_ms()
local tenants = tail(2)
if #tenants == 0 then
  tenants = redis.call('ZRANGE', QUEUE_TENANTS, 0, -1)
  for _, t in ipairs(redis.call('SMEMBERS', HOLDING)) do tenants[#tenants + 1] = t end
  for _, t in ipairs(redis.call('SMEMBERS', UNFIT_TENANTS)) do tenants[#tenants + 1] = t end
end
for _, t in ipairs(tenants) do reindex(t, now) end
return #tenants
"""
)


# KEYS: none.  ARGV: none.  Runs nothing but the prelude, whose migrate_once() brings old state up to
# date (fleet.scheduling.migrate_state).
MIGRATE = PRELUDE + "return redis.call('HGET', CLUSTER, 'schema')"
