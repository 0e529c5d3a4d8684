"""Lua of the scheduler: usage with decay, the index of waiting tenants, admission and preemption.

fleet.queue_scripts appends `FUNCTIONS` to its prelude (so every script that changes a queue, a usage
or a quota re-indexes the tenant in the same atomic step) and runs `ADMIT` as the claim. The policy is
Kueue's admission fair sharing, written out in docs/scheduling.md; fleet.fair_share holds the same
formulas in Python for the views and estimates.

State (keys in fleet.keys): per tenant `sched_tenant` {consumed, at_ms, gpus, preempting, slot, co_growth}; the
cluster's `sched_cluster` {allocated, incoming}; each queued job's hash carries `gpus`,
`priority_value`, `queue_seq` (its place: the creation seq, or a fresh one when sent to the back) and
`not_before_ms` (a placement back-off: the job is parked in `sched_backoff`, out of its queue, so the
tenant's next job is not held up, and goes back to its place when the time is up).

Usage: consumed(t) = current + (consumed₀ − current)·2^(−(t − t₀)/H), the closed form of
consumed ← (1 − α)·consumed + α·current with α(Δt) = 1 − 0.5^(Δt/H); it composes exactly, so it is
updated only when `current` (the GPUs the tenant holds) changes. H = 0: consumed = current.
Score = consumed / weight. Queue heads are ordered by their entry score (fleet.fair_share.entry_score):
the score halfway from now to where admitting the head would take it, so a tenant whose jobs are large
for its weight is not admitted while just below its share and left well above it.

The index, so that a decision never scans the queued jobs or every tenant:
- A tenant holding no GPUs has score(t) = consumed₀·2^(−(t−t₀)/H)/w, whose order among such tenants
  never changes: key = log2(consumed₀/w) + t₀/H; its entry score is a·score(t) + b with a and b set by
  its weight w and head size g, so among tenants of the same (w, g) that order is the entry order too.
  Its queue head sits in one bucket (a sorted set) per (tier, kind, weight w, head GPUs g): tier 0 fits
  within nominal, 1 must borrow but the tenant is below nominal (may reclaim), 2 must borrow; kind "k"
  is scored by key, kind "z" (no usage left: equal entry scores) by the head's queue score (priority,
  then age), Kueue's tie-breaks. A decision reads each bucket's minimum, and up to 8 members of a bucket
  that may reclaim and does not fit: O(buckets × 8), buckets ≤ tiers × sizes × distinct weights.
- Tenants holding GPUs (at most one per running job) are scored directly (`sched_holding`).
- Idle tenants blocked by their own limits (head over nominal + borrowing limit, max_running_jobs 0)
  are in no bucket.
"""

from __future__ import annotations

from fleet import keys

# Queue score = (1 − priority_value)·2^46 + queue_seq: higher priority first, then older. Exact in a
# double while queue_seq < 2^46.
PRIORITY_SPAN = 2**46
DEFAULT_HALF_LIFE_MS = 3_600_000  # Settings.fair_share_half_life_s's default, until a process writes one
DEFAULT_STARVATION_GUARD_MS = 300_000  # Settings.starvation_guard_s's default, until a process writes one
# T of the entry score (fleet.fair_share.entry_score): how long an admitted head is taken to hold its
# GPUs, the job length the queue estimates assume too (fleet.scheduler_view.ASSUMED_JOB_S).
ENTRY_HORIZON_MS = 3_600_000
# The layout of the scheduler's state; a script finding an older one brings it up to date first
# (migrate_once). 2: buckets keyed by weight too.
SCHEMA = "2"

FUNCTIONS = f"""
local Q_PREFIX = '{keys.queue("")}'
local QUEUE_TENANTS = '{keys.queue_tenants()}'
local RUNNING = '{keys.running_per_tenant()}'
local LEASES = '{keys.leases()}'
local WAKEUP = '{keys.wakeup()}'
local JOB_SEQ = '{keys.job_seq()}'
local ST_PREFIX = '{keys.sched_tenant("")}'
local CLUSTER = '{keys.sched_cluster()}'
local CONFIG = '{keys.sched_config()}'
local BUCKET_PREFIX = '{keys.sched_bucket_prefix()}'
local BUCKETS = '{keys.sched_buckets()}'
local HOLDING = '{keys.sched_holding()}'
local BACKOFF = '{keys.sched_backoff()}'
local UNFIT_PREFIX = '{keys.sched_unfit("")}'
local UNFIT_TENANTS = '{keys.sched_unfit_tenants()}'
local EVENTS_KEY = '{keys.job_events("%s")}'  -- string.format(EVENTS_KEY, job_id)
local RUNNING_JOBS = '{keys.sched_running_jobs()}'
local HOLDERS = '{keys.sched_running_holders()}'
local CAPACITY = '{keys.capacity()}'
local CO_GROUP_PREFIX = '{keys.sched_co_group("")}'
local CO_MEMBER_OF = '{keys.sched_co_member_of()}'
local PRIORITY_SPAN = {PRIORITY_SPAN}
local DEFAULT_HALF_LIFE_MS = {DEFAULT_HALF_LIFE_MS}
local DEFAULT_STARVATION_GUARD_MS = {DEFAULT_STARVATION_GUARD_MS}
local ENTRY_HORIZON_MS = {ENTRY_HORIZON_MS}
local SCHEMA = '{SCHEMA}'
""" + r"""
local function num(s, default) if s then return tonumber(s) end return default end
local function float(x) return string.format('%.17g', x) end
local function half_life_ms() return num(redis.call('HGET', CONFIG, 'half_life_ms'), DEFAULT_HALF_LIFE_MS) end
-- consumed at `now`, given consumed0 at t0 and `current` GPUs held since t0
local function decayed(c0, t0, current, now, hl)
  if hl <= 0 then return current end
  local dt = now - t0
  if dt < 0 then dt = 0 end
  return current + (c0 - current) * math.pow(2, -dt / hl)
end
-- The order of a queue head (fleet.fair_share.entry_score): usage per weight halfway to where admitting
-- its g GPUs would take it over ENTRY_HORIZON_MS, at consumed c and `current` GPUs held.
local function entry_score(c, current, g, w, hl)
  local a = 1
  if hl > 0 then a = 1 - math.pow(2, -ENTRY_HORIZON_MS / hl) end
  return (c + 0.5 * a * (current + g - c)) / w
end
-- A tenant's state in one read: usage, its queue head and its quota as `reindex` last cached them.
local function tenant_state(tenant)
  local v = redis.call('HMGET', ST_PREFIX .. tenant, 'consumed', 'at_ms', 'gpus', 'preempting', 'slot', 'running',
                       'head', 'head_gpus', 'head_qscore', 'nominal', 'borrow', 'max_running', 'weight', 'co_growth')
  local st = {consumed = num(v[1], 0), at = num(v[2], 0), gpus = num(v[3], 0), preempting = num(v[4], 0),
              slot = v[5] or '', running = num(v[6], 0), growth = num(v[14], 0) / 1000}
  if v[7] and v[7] ~= '' then st.head = {id = v[7], gpus = num(v[8], 1), qscore = num(v[9], 0)} end
  st.q = {nominal = num(v[10], 0), borrow = num(v[11], nil), max_running = num(v[12], nil), weight = num(v[13], 1)}
  return st
end
local function quota_of(tenant)
  local key = QUOTA_PREFIX .. tenant
  if redis.call('EXISTS', key) == 0 then key = DEFAULT_QUOTA end
  local v = redis.call('HMGET', key, 'nominal_gpus', 'borrowing_limit_gpus', 'max_running_jobs', 'weight')
  return {nominal = num(v[1], 0), borrow = num(v[2], nil), max_running = num(v[3], nil), weight = num(v[4], 1)}
end
local function queue_score(job_key)
  local v = redis.call('HMGET', job_key, 'priority_value', 'queue_seq', 'seq')
  return (1 - num(v[1], 0)) * PRIORITY_SPAN + num(v[2] or v[3], 0)
end
local function head_of(tenant)
  local h = redis.call('ZRANGE', Q_PREFIX .. tenant, 0, 0, 'WITHSCORES')
  if #h == 0 then return nil end
  return {id = h[1], qscore = tonumber(h[2]), gpus = num(redis.call('HGET', JOB_KEY_PREFIX .. h[1], 'gpus'), 1)}
end
-- Admitting g more GPUs at usage u: 0 within nominal; 1 borrowing from below nominal; 2 borrowing;
-- nil over nominal + borrowing limit. `growth` (st.growth): GPUs the tenant's co-trained shares may still
-- grow by as other members leave (co_grow); the borrowing limit, a hard one, bounds them too, the tier not.
local function tier_of(q, u, g, growth)
  if q.borrow and u + (growth or 0) + g > q.nominal + q.borrow then return nil end
  if u + g <= q.nominal then return 0 end
  if u < q.nominal then return 1 end
  return 2
end
-- A job of g GPUs can never be admitted under quota q (it exceeds nominal + borrowing limit).
local function never_fits(q, g) return q.borrow ~= nil and g > q.nominal + q.borrow end
-- A bucket's tier and kind, from its name as reindex builds it: <prefix><tier>:<kind>:w<weight>:<head GPUs>.
local function bucket_parts(bucket)
  local tier, kind = string.match(bucket, ':(%d):(%a):w[^:]+:%d+$')
  return tonumber(tier), kind
end
-- The entry score of a tenant's queue head (state st): an idle tenant's from its bucket's `kind` and
-- `key` (the order reindex filed it under), a tenant holding GPUs (kind nil) from its usage.
local function head_score(st, now, hl, kind, key)
  if kind == nil then
    return entry_score(decayed(st.consumed, st.at, st.gpus, now, hl), st.gpus, st.head.gpus, st.q.weight, hl)
  end
  local consumed = 0
  if kind == 'k' and hl > 0 then consumed = math.pow(2, key - now / hl) * st.q.weight end
  return entry_score(consumed, 0, st.head.gpus, st.q.weight, hl)
end
-- Admission's order of candidates {tier, score, u, q, head} (fleet.fair_share.entry_key, Kueue's):
-- within nominal first, then lower entry score, fewer GPUs held per weight, higher priority, older.
-- ADMIT and CO_JOIN both sort by it, so a co-training join takes heads exactly as admission would.
local function entry_before(a, b)
  local ta, tb = math.min(a.tier, 1), math.min(b.tier, 1)
  if ta ~= tb then return ta < tb end
  if a.score ~= b.score then return a.score < b.score end
  local ua, ub = a.u / a.q.weight, b.u / b.q.weight  -- equal scores (same instant, H = 0): fewer GPUs held
  if ua ~= ub then return ua < ub end
  return a.head.qscore < b.head.qscore
end
-- The starvation guard (Kueue's spirit) on candidates sorted by entry_before: the first head that has
-- waited longer than guard_ms (starvation_guard_ms()) and could fit `total` GPUs moves to the
-- front of its tier's (within nominal / borrowing). Returns it (nil: none, or the guard is off). It
-- must go first: the entry score weighs the head's size, so an idle tenant's small head can keep
-- coming before a waiting gang of a tenant with the same usage.
local function starvation_guard_ms()
  return num(redis.call('HGET', CONFIG, 'starvation_guard_ms'), DEFAULT_STARVATION_GUARD_MS)
end
local function starvation_guard(cands, total, now, guard_ms)
  if guard_ms <= 0 then return nil end
  for idx, c in ipairs(cands) do
    if c.head.gpus <= total then
      local since = num(redis.call('HGET', JOB_KEY_PREFIX .. c.head.id, 'queued_at_ms'), now)
      if now - since > guard_ms then
        local first = idx
        while first > 1 and math.min(cands[first - 1].tier, 1) == math.min(c.tier, 1) do first = first - 1 end
        table.remove(cands, idx)
        table.insert(cands, first, c)
        return c
      end
    end
  end
  return nil
end
local function opt(x) if x == nil then return '' end return float(x) end
-- The tenant's queued jobs, wherever they wait: its queue and those parked out of it (max_queued_jobs).
local function queued_jobs(tenant)
  return redis.call('ZCARD', Q_PREFIX .. tenant) + num(redis.call('HGET', ST_PREFIX .. tenant, 'parked'), 0)
end
local function job_event(job_id, message)
  -- not trimmed here: the stream's cap is the API's setting, and the next append through it trims
  redis.call('XADD', string.format(EVENTS_KEY, job_id), '*', 'created_at', sec(now_ms()), 'level', 'warn',
             'message', message, 'type', 'message')
end
-- Park a queued job out of its queue until `until_ms` (a placement back-off, or math.huge: set aside
-- until its tenant's quota changes); ADMIT (or reindex) puts it back.
local function park(tenant, job_id, until_ms)
  if until_ms < math.huge then redis.call('HSET', JOB_KEY_PREFIX .. job_id, 'not_before_ms', int(until_ms)) end
  if redis.call('ZADD', BACKOFF, float(until_ms), job_id) == 1 then
    redis.call('HINCRBY', ST_PREFIX .. tenant, 'parked', 1)
  end
end
-- A parked job leaves the back-off set (returns true when it was there).
local function unpark(tenant, job_id)
  if redis.call('ZREM', BACKOFF, job_id) == 0 then return false end
  if tenant then
    redis.call('HINCRBY', ST_PREFIX .. tenant, 'parked', -1)
    local uk = UNFIT_PREFIX .. tenant
    if redis.call('ZREM', uk, job_id) == 1 and redis.call('EXISTS', uk) == 0 then
      redis.call('SREM', UNFIT_TENANTS, tenant)
    end
  end
  return true
end
-- Jobs that can never fit the tenant's quota leave the head of its queue (its other jobs go on); on a
-- quota change every job set aside goes back to its place (those that still cannot fit leave again).
local function set_aside_unfit(tenant, q, now)
  local uk = UNFIT_PREFIX .. tenant
  local qkey = Q_PREFIX .. tenant
  if redis.call('EXISTS', uk) == 1 then
    local cached = redis.call('HMGET', ST_PREFIX .. tenant, 'nominal', 'borrow')
    if cached[1] ~= float(q.nominal) or (cached[2] or '') ~= opt(q.borrow) then
      for _, jid in ipairs(redis.call('ZRANGE', uk, 0, -1)) do
        if unpark(tenant, jid) then
          redis.call('ZADD', qkey, queue_score(JOB_KEY_PREFIX .. jid), jid)
          redis.call('ZADD', QUEUE_TENANTS, 'NX', now, tenant)
          job_event(jid, "Back in the queue at its place: the tenant's quota changed.")
        end
      end
      redis.call('LPUSH', WAKEUP, 'requeued')
      redis.call('LTRIM', WAKEUP, 0, 63)
    end
  end
  local head = head_of(tenant)
  while head and never_fits(q, head.gpus) do
    redis.call('ZREM', qkey, head.id)
    park(tenant, head.id, math.huge)
    redis.call('ZADD', uk, head.qscore, head.id)
    redis.call('SADD', UNFIT_TENANTS, tenant)
    job_event(head.id, string.format("Set aside: it asks for %d GPUs, more than the tenant's quota allows (nominal %d "
      .. "+ borrowing limit %d = %d), so it cannot fit the tenant's quota; the tenant's other jobs go on. It returns "
      .. "to its place when an admin changes the quota; or cancel it and submit a smaller one.",
      head.gpus, q.nominal, q.borrow, q.nominal + q.borrow))
    head = head_of(tenant)
  end
  if not head then redis.call('ZREM', QUEUE_TENANTS, tenant) end
  return head
end
local function unindex(tenant, slot)
  if slot == '' then return end
  redis.call('ZREM', slot, tenant)
  if redis.call('EXISTS', slot) == 0 then redis.call('ZREM', BUCKETS, slot) end
end
-- Put the tenant's queue head where decisions find it (see the module docstring) and cache its head
-- and quota in its state; call after any change to its queue, usage or quota.
local function reindex(tenant, now)
  local st = tenant_state(tenant)
  local slot = ''
  local q = quota_of(tenant)
  local head = set_aside_unfit(tenant, q, now)
  local h = head or {id = '', gpus = 0, qscore = 0}
  redis.call('HSET', ST_PREFIX .. tenant, 'head', h.id, 'head_gpus', int(h.gpus), 'head_qscore', float(h.qscore),
             'nominal', float(q.nominal), 'borrow', opt(q.borrow), 'max_running', opt(q.max_running),
             'weight', float(q.weight))
  if head and st.gpus <= 0 then
    local tier = tier_of(q, 0, head.gpus)
    if tier and (q.max_running == nil or q.max_running > 0) then
      local hl = half_life_ms()
      local kind, score = 'z', head.qscore
      if hl > 0 and st.consumed > 0 then
        kind, score = 'k', math.log(st.consumed / q.weight) / math.log(2) + st.at / hl
      end
      slot = BUCKET_PREFIX .. tier .. ':' .. kind .. ':w' .. float(q.weight) .. ':' .. int(head.gpus)
      redis.call('ZADD', slot, float(score), tenant)
      redis.call('ZADD', BUCKETS, head.gpus, slot)
    end
  end
  if slot ~= st.slot then
    unindex(tenant, st.slot)
    redis.call('HSET', ST_PREFIX .. tenant, 'slot', slot)
  end
end
-- GPUs as stored: whole numbers as integers, a co-training member's share to the milli-GPU.
local function gpus_str(g)
  g = math.floor(g * 1000 + 0.5) / 1000
  if g == math.floor(g) then return int(g) end
  return string.format('%.3f', g)
end
-- The tenant now holds dg more GPUs in dj more running jobs: fold the usage up to now, then re-index.
-- `pooled`: dg is a change in a co-training member's share of GPUs its group already holds, so the
-- cluster's allocation does not change (fleet.co_training).
local function add_usage(tenant, dg, dj, now, pooled)
  local st = tenant_state(tenant)
  local hl = half_life_ms()
  local gpus = tonumber(gpus_str(st.gpus + dg))
  local consumed = decayed(st.consumed, st.at, st.gpus, now, hl)
  if hl <= 0 then consumed = gpus end
  redis.call('HSET', ST_PREFIX .. tenant, 'consumed', float(consumed), 'at_ms', int(now), 'gpus', gpus_str(gpus),
             'running', int(st.running + dj))
  if redis.call('HINCRBY', RUNNING, tenant, dj) <= 0 then redis.call('HDEL', RUNNING, tenant) end
  if not pooled then redis.call('HINCRBY', CLUSTER, 'allocated', dg) end
  if gpus > 0 then redis.call('SADD', HOLDING, tenant) else redis.call('SREM', HOLDING, tenant) end
  reindex(tenant, now)
end
-- Queue a job at its place (its queue_seq; `to_back`: a fresh one, behind every job queued so far).
local function enqueue(tenant, job_id, to_back, now)
  local job_key = JOB_KEY_PREFIX .. job_id
  if to_back then redis.call('HSET', job_key, 'queue_seq', redis.call('INCR', JOB_SEQ)) end
  redis.call('HSETNX', job_key, 'queued_at_ms', int(now))  -- since when it waits (the starvation guard)
  redis.call('ZADD', Q_PREFIX .. tenant, queue_score(job_key), job_id)
  redis.call('ZADD', QUEUE_TENANTS, 'NX', now, tenant)
  redis.call('LPUSH', WAKEUP, job_id)
  redis.call('LTRIM', WAKEUP, 0, 63)
  reindex(tenant, now)
end
local function unqueue(tenant, job_id, now)
  local qkey = Q_PREFIX .. tenant
  unpark(tenant, job_id)
  redis.call('ZREM', qkey, job_id)
  if redis.call('ZCARD', qkey) == 0 then redis.call('ZREM', QUEUE_TENANTS, tenant) end
  reindex(tenant, now)
end
-- Record what a running attempt holds (release reads it back, even with the job's record gone).
-- Entry: "<gpus> <gpus being preempted> <tenant>".
local function hold(tenant, job_id, gpus, preempting)
  redis.call('HSET', HOLDERS, job_id, int(gpus) .. ' ' .. int(preempting) .. ' ' .. tenant)
end
-- The tenant's GPUs being preempted change by d (whole GPUs, or a co-trained member's share: to the milli-GPU).
local function add_preempting(tenant, d)
  if d == 0 then return end
  local p = num(redis.call('HGET', ST_PREFIX .. tenant, 'preempting'), 0) + d
  redis.call('HSET', ST_PREFIX .. tenant, 'preempting', gpus_str(math.max(p, 0)))
end
-- Co-training (fleet.co_training, docs/scheduling.md#co-training). A group holds its first member's
-- gang once; each member counts an equal share of it (milli-GPUs, `m:<job>` in the group's hash) in its
-- tenant's usage, for fair share and its tier. Shares are rebalanced whenever a member joins or leaves;
-- in a group being preempted (`preempting`: its GPUs, coming back once the last member is out) each
-- member's share is being preempted too, so its tenant's `preempting` follows the share.
-- A tenant's shares may grow back to all of each of its groups' GPUs as the others leave, so the
-- borrowing limit (a hard limit: tier_of) counts that too: its `co_growth` (milli-GPUs) is, over the
-- groups it has members in, the group's GPUs less its members' shares there.
local function co_grow(tenant, milli)
  if milli ~= 0 and redis.call('HINCRBY', ST_PREFIX .. tenant, 'co_growth', milli) == 0 then
    redis.call('HDEL', ST_PREFIX .. tenant, 'co_growth')
  end
end
-- Whether the tenant has a member in the group (hash key gk).
local function co_has_member(gk, tenant)
  local flat = redis.call('HGETALL', gk)
  for i = 1, #flat, 2 do
    if string.sub(flat[i], 1, 2) == 'm:' and string.match(flat[i + 1], '^%d+ (.*)$') == tenant then return true end
  end
  return false
end
local function co_rebalance(gid, now)
  local gk = CO_GROUP_PREFIX .. gid
  local gv = redis.call('HMGET', gk, 'gpus', 'preempting')
  local g, preempting = num(gv[1], 1), num(gv[2], 0) > 0
  local members = {}
  local flat = redis.call('HGETALL', gk)
  for i = 1, #flat, 2 do
    if string.sub(flat[i], 1, 2) == 'm:' then
      local milli, tenant = string.match(flat[i + 1], '^(%d+) (.*)$')
      members[#members + 1] = {field = flat[i], milli = tonumber(milli), tenant = tenant}
    end
  end
  if #members == 0 then return 0 end
  table.sort(members, function(a, b) return a.field < b.field end)
  local total = g * 1000
  local base = math.floor(total / #members)
  for i, m in ipairs(members) do
    local share = base
    if i <= total - base * #members then share = share + 1 end
    if share ~= m.milli then
      add_usage(m.tenant, (share - m.milli) / 1000, 0, now, true)
      if preempting then add_preempting(m.tenant, (share - m.milli) / 1000) end
      co_grow(m.tenant, m.milli - share)
      redis.call('HSET', gk, m.field, int(share) .. ' ' .. m.tenant)
    end
  end
  return #members
end
-- A member's attempt ended: its share goes back to the others; the last one out returns the gang (and,
-- in a group being preempted, the GPUs counted as incoming until then).
-- Returns false when the job trains in no group (release accounts it as a job of its own).
local function co_release(tenant, job_id, now)
  local gid = redis.call('HGET', CO_MEMBER_OF, job_id)
  if not gid then return false end
  redis.call('HDEL', CO_MEMBER_OF, job_id)
  local gk = CO_GROUP_PREFIX .. gid
  local mine = redis.call('HGET', gk, 'm:' .. job_id)
  redis.call('HDEL', gk, 'm:' .. job_id)
  local milli = 0
  if mine then milli = tonumber(string.match(mine, '^(%d+) ')) end
  local preempting = num(redis.call('HGET', gk, 'preempting'), 0)
  if preempting > 0 then add_preempting(tenant, -milli / 1000) end
  add_usage(tenant, -milli / 1000, -1, now, true)
  local growth = milli  -- its share no longer counts; nor, with its tenant's last member gone, the group
  if mine and not co_has_member(gk, tenant) then growth = growth - num(redis.call('HGET', gk, 'gpus'), 1) * 1000 end
  co_grow(tenant, growth)
  if co_rebalance(gid, now) == 0 then
    redis.call('HINCRBY', CLUSTER, 'allocated', -num(redis.call('HGET', gk, 'gpus'), 1))
    if preempting > 0 then redis.call('HINCRBY', CLUSTER, 'incoming', -preempting) end
    redis.call('DEL', gk)
  end
  return true
end
-- A running attempt ended (any way): its GPUs go back, with any preemption that was coming, and an
-- idle dispatcher is woken if anything waits.
local function release(tenant, job_id, now)
  local job_key = JOB_KEY_PREFIX .. job_id
  redis.call('ZREM', LEASES, job_id)
  redis.call('ZREM', RUNNING_JOBS, job_id)
  local v = redis.call('HMGET', job_key, 'gpus', 'preempting_gpus')
  local held = redis.call('HGET', HOLDERS, job_id)  -- what the attempt holds (the record may be gone)
  if held then
    local g, p = string.match(held, '^(%d+) (%d+) ')
    v[1] = g
    if tonumber(p) > 0 then v[2] = p end
  end
  redis.call('HDEL', HOLDERS, job_id)
  if v[2] then  -- a co-trained member's is 0: its group's GPUs come back in co_release
    if tonumber(v[2]) > 0 then
      redis.call('HINCRBY', CLUSTER, 'incoming', -tonumber(v[2]))
      add_preempting(tenant, -tonumber(v[2]))
    end
    redis.call('HDEL', job_key, 'preempting_gpus')
  end
  if not co_release(tenant, job_id, now) then add_usage(tenant, -num(v[1], 1), -1, now) end
  if redis.call('ZCARD', QUEUE_TENANTS) > 0 then  -- freed GPUs may admit waiting work: wake a dispatcher
    redis.call('LPUSH', WAKEUP, 'released')
    redis.call('LTRIM', WAKEUP, 0, 63)
  end
end
-- Start candidate c's queue head (c.tenant, c.head = {id, gpus, qscore}): out of its queue, running
-- under a fresh attempt and claim token, leased, in the preemption order, holding c.head.gpus. The
-- caller accounts the usage and announces it. Returns attempt, lease expiry; nil when the index was
-- stale (re-indexed: decide again).
local function start_job(c, now, worker_id, lease_ms, token)
  local job_key = JOB_KEY_PREFIX .. c.head.id
  if redis.call('ZRANGE', Q_PREFIX .. c.tenant, 0, 0)[1] ~= c.head.id then  -- a stale cache: never, but check
    reindex(c.tenant, now)
    return nil
  end
  redis.call('ZREM', Q_PREFIX .. c.tenant, c.head.id)
  if redis.call('ZCARD', Q_PREFIX .. c.tenant) == 0 then redis.call('ZREM', QUEUE_TENANTS, c.tenant) end
  if redis.call('HGET', job_key, 'status') ~= 'queued' then
    reindex(c.tenant, now)
    return nil
  end
  local attempt = redis.call('HINCRBY', job_key, 'attempt', 1)
  local expires = now + tonumber(lease_ms)
  redis.call('HSET', job_key, 'status', 'running', 'worker_id', worker_id, 'lease_expires_at_ms', int(expires),
             'claim_token', token, 'updated_at', sec(now))
  redis.call('HSETNX', job_key, 'started_at', sec(now))
  redis.call('HDEL', job_key, 'control', 'not_before_ms', 'preempting_gpus', 'queued_at_ms')
  redis.call('ZADD', LEASES, expires, c.head.id)
  local order = redis.call('HINCRBY', CLUSTER, 'admissions', 1)
  local prio = 1 - math.floor(c.head.qscore / PRIORITY_SPAN)
  redis.call('ZADD', RUNNING_JOBS, (prio + 1) * PRIORITY_SPAN + (PRIORITY_SPAN - order), c.head.id)
  hold(c.tenant, c.head.id, c.head.gpus, 0)
  return attempt, expires
end
-- State written before the scheduler (list queues, running jobs with no GPUs counted) is brought up
-- to date by the first script that runs after an upgrade, before it does anything else; afterwards
-- this costs one HGET. Jobs get the scalars the scheduler reads: a queued job without `gpus` will run
-- on one; a running one holds what the previous release gave every job (CONFIG's legacy_job_gpus,
-- its TRAIN_WORKERS_PER_JOB, written by fleet.scheduling.migrate_state; 1 when unknown).
-- The mark lives in the counters it vouches for (CLUSTER): counters that are gone are recounted.
local function migrate_once()
  if redis.call('HGET', CLUSTER, 'schema') == SCHEMA then return end
  local now = now_ms()
  local function backfill(job_key)
    redis.call('HSETNX', job_key, 'gpus', 1)
    redis.call('HSETNX', job_key, 'priority_value', 0)
    redis.call('HSETNX', job_key, 'queue_seq', redis.call('HGET', job_key, 'seq') or 0)
    redis.call('HSETNX', job_key, 'queued_at_ms', int(now))
  end
  for _, t in ipairs(redis.call('ZRANGE', QUEUE_TENANTS, 0, -1)) do
    local qkey = Q_PREFIX .. t
    if redis.call('TYPE', qkey)['ok'] == 'list' then
      local ids = redis.call('LRANGE', qkey, 0, -1)
      redis.call('DEL', qkey)
      for _, jid in ipairs(ids) do
        backfill(JOB_KEY_PREFIX .. jid)
        redis.call('ZADD', qkey, queue_score(JOB_KEY_PREFIX .. jid), jid)
      end
    end
  end
  if redis.call('EXISTS', CLUSTER) == 0 then  -- running jobs admitted before GPUs were counted
    redis.call('DEL', RUNNING)  -- recounted below
    for _, jid in ipairs(redis.call('ZRANGE', LEASES, 0, -1)) do
      local job_key = JOB_KEY_PREFIX .. jid
      local v = redis.call('HMGET', job_key, 'status', 'tenant_id')
      if v[1] == 'running' and v[2] then
        redis.call('HSETNX', job_key, 'gpus', num(redis.call('HGET', CONFIG, 'legacy_job_gpus'), 1))
        backfill(job_key)
        local order = redis.call('HINCRBY', CLUSTER, 'admissions', 1)
        local prio = tonumber(redis.call('HGET', job_key, 'priority_value'))
        redis.call('ZADD', RUNNING_JOBS, (prio + 1) * PRIORITY_SPAN + (PRIORITY_SPAN - order), jid)
        hold(v[2], jid, tonumber(redis.call('HGET', job_key, 'gpus')), 0)
        add_usage(v[2], tonumber(redis.call('HGET', job_key, 'gpus')), 1, now)
      end
    end
  end
  for _, t in ipairs(redis.call('ZRANGE', QUEUE_TENANTS, 0, -1)) do reindex(t, now) end
  redis.call('HSET', CLUSTER, 'schema', SCHEMA)
end
migrate_once()
"""

# Run as the body of queue_scripts.CLAIM, after the prelude.
# ARGV: worker_id, lease_ms, claim_token (fresh, random), clock_ms ('' = the Redis clock)
# Returns {'claimed', job_id, attempt, lease_expires_ms, tenant, preempted} or {'none', preempted}
# (preempted: how many running jobs this decision asked to stop).
ADMIT = r"""
CLOCK = clock_arg(ARGV[4])
local now = now_ms()
local hl = half_life_ms()
-- 1. jobs whose placement back-off is over go back to their places
for _, jid in ipairs(redis.call('ZRANGEBYSCORE', BACKOFF, '-inf', now, 'LIMIT', 0, 100)) do
  local v = redis.call('HMGET', JOB_KEY_PREFIX .. jid, 'status', 'tenant_id')
  unpark(v[2], jid)
  redis.call('HDEL', JOB_KEY_PREFIX .. jid, 'not_before_ms')
  if v[1] == 'queued' then enqueue(v[2], jid, false, now) end
end
-- 2. capacity: unknown (no dispatcher reported nodes) bounds nothing
local inf = math.huge
local total = num(redis.call('HGET', CAPACITY, 'total_gpus'), inf)
local cl = redis.call('HMGET', CLUSTER, 'allocated', 'incoming')
local allocated, incoming = math.max(num(cl[1], 0), 0), math.max(num(cl[2], 0), 0)
local free = math.max(total - allocated, 0)
-- 3. candidates: each bucket's minimum (the first RECLAIM_DEPTH of a bucket that may reclaim: one that
-- may not preempt must not hide one that may; members of a bucket share their head's size, so the
-- later ones can never be admitted before the minimum, only reclaim), and every tenant holding GPUs
local RECLAIM_DEPTH = 8
local guard_ms = starvation_guard_ms()
local cands = {}
local buckets = redis.call('ZRANGE', BUCKETS, 0, -1, 'WITHSCORES')
for i = 1, #buckets, 2 do
  local bucket, g = buckets[i], tonumber(buckets[i + 1])
  local tier, kind = bucket_parts(bucket)
  if tier < 2 or g <= free or guard_ms > 0 then  -- a head that does not fit may be the one to guard
    local depth = 1
    if tier < 2 and g > free then depth = RECLAIM_DEPTH end
    local m = redis.call('ZRANGE', bucket, 0, depth - 1, 'WITHSCORES')
    for j = 1, #m, 2 do
      local st = tenant_state(m[j])
      local score = 0
      if st.head then score = head_score(st, now, hl, kind, tonumber(m[j + 1])) end
      cands[#cands + 1] = {tenant = m[j], tier = tier, score = score, u = 0, head = st.head, q = st.q}
    end
  end
end
local states = {}  -- tenants holding GPUs, read once: candidates here, victims' tenants in read_pool
for _, t in ipairs(redis.call('SMEMBERS', HOLDING)) do
  local st = tenant_state(t)
  states[t] = st
  if st.head then
    local q = st.q
    local tier = tier_of(q, st.gpus, st.head.gpus, st.growth)
    if tier and (q.max_running == nil or st.running < q.max_running) then
      cands[#cands + 1] = {tenant = t, tier = tier, score = head_score(st, now, hl), u = st.gpus, head = st.head, q = q}
    end
  end
end
local ready = {}
for _, c in ipairs(cands) do
  if c.head then ready[#ready + 1] = c end
end
cands = ready
table.sort(cands, entry_before)
-- The guarded head (starvation_guard) goes first among its tier's, and the walk stops at it (step 4).
local guarded = starvation_guard(cands, total, now, guard_ms)
-- GPUs of the jobs queued behind c's head that fit, in order, within c's nominal quota with it
-- (read at most MAX_RECLAIM_JOBS of them).
local MAX_RECLAIM_JOBS = 64
local function within_nominal_after_head(c)
  local budget = c.q.nominal - c.u - c.head.gpus
  if budget <= 0 then return 0 end
  local total = 0
  -- each job takes at least one GPU; a co-trained share leaves a fractional budget (ZRANGE wants an integer)
  for _, jid in ipairs(redis.call('ZRANGE', Q_PREFIX .. c.tenant, 1, math.min(math.floor(budget), MAX_RECLAIM_JOBS))) do
    local g = num(redis.call('HGET', JOB_KEY_PREFIX .. jid, 'gpus'), 1)
    if total + g > budget then break end
    total = total + g
  end
  return total
end
-- Reclaim for `c` (below nominal, its head does not fit): pick borrowers' running work, lowest priority
-- then most recently admitted, while c's share after admission <= each victim tenant's share after the
-- preemption (share = GPUs above nominal / weight); all or nothing. Returns (jobs asked, GPUs freed).
-- A victim is a unit that frees GPUs: a job alone, or a whole co-training group (its GPUs free only
-- when every member is out), whose members are asked to stop together. A group is taken only when the
-- rule holds for every member's tenant with all of that tenant's members' shares taken away (each
-- above its nominal quota), none of its members is the reclaiming tenant's or already asked to stop,
-- and it no longer takes joiners; it sits in the order where its highest-priority, earliest-admitted
-- member would (a low-priority member does not expose the others).
-- The running jobs and their tenants' usage are read once per decision (`pool`), so each attempt is
-- arithmetic over at most one entry per running job.
local pool = nil
local function read_pool()
  local units, usage, quotas, groups = {}, {}, {}, {}
  for _, jid in ipairs(redis.call('ZRANGE', RUNNING_JOBS, 0, -1)) do
    local v = redis.call('HMGET', JOB_KEY_PREFIX .. jid, 'tenant_id', 'gpus', 'control', 'status')
    local vt = v[1]
    local ok = vt and not v[3] and v[4] == 'running'
    if ok and usage[vt] == nil then
      local st = states[vt] or tenant_state(vt)
      usage[vt], quotas[vt] = st.gpus - st.preempting, st.q
    end
    local gid = redis.call('HGET', CO_MEMBER_OF, jid)
    if gid then
      local unit = groups[gid]
      if unit == nil then  -- the group's GPUs, members and shares, read once
        local gk = CO_GROUP_PREFIX .. gid
        unit = {gid = gid, gpus = num(redis.call('HGET', gk, 'gpus'), 1), shares = {}, members = {}, left = 0,
                ok = num(redis.call('HGET', gk, 'preempting'), 0) == 0, milli = {}}
        local flat = redis.call('HGETALL', gk)
        for i = 1, #flat, 2 do
          if string.sub(flat[i], 1, 2) == 'm:' then
            unit.left = unit.left + 1
            unit.milli[string.sub(flat[i], 3)] = tonumber(string.match(flat[i + 1], '^(%d+) '))
          end
        end
        groups[gid] = unit
      end
      local share = (unit.milli[jid] or 0) / 1000
      unit.ok = unit.ok and ok and unit.milli[jid] ~= nil
      if vt then unit.shares[vt] = (unit.shares[vt] or 0) + share end
      unit.members[#unit.members + 1] = {id = jid, tenant = vt, share = share}
      unit.left = unit.left - 1
      if unit.left == 0 and unit.ok then units[#units + 1] = unit end  -- at its last member in the order
    elseif ok then
      local g = num(v[2], 1)
      units[#units + 1] = {id = jid, tenant = vt, gpus = g, shares = {[vt] = g}}
    end
  end
  return {jobs = units, usage = usage, quotas = quotas}
end
-- Frees at least `need` GPUs or none; goes on toward `goal` (>= need) while victims qualify.
local function preempt_for(c, need, goal)
  pool = pool or read_pool()
  local share_after = math.max(c.u + c.head.gpus - c.q.nominal, 0) / c.q.weight
  local usage, picked, freed = {}, {}, 0
  for _, j in ipairs(pool.jobs) do
    if not j.shares[c.tenant] and not j.taken then
      local ok = true
      for vt, s in pairs(j.shares) do
        local qv, u = pool.quotas[vt], usage[vt] or pool.usage[vt]
        if not (u > qv.nominal and share_after <= math.max(u - s - qv.nominal, 0) / qv.weight) then
          ok = false
          break
        end
      end
      if ok then
        picked[#picked + 1] = j
        for vt, s in pairs(j.shares) do usage[vt] = (usage[vt] or pool.usage[vt]) - s end
        freed = freed + j.gpus
        if freed >= goal then break end
      end
    end
  end
  if freed < need then return 0, 0 end
  -- keep only victims needed (Kueue's fill-back): a later, larger pick may make earlier ones unneeded;
  -- sparing a victim leaves its tenants more usage, which only raises the others' share after
  for i = #picked, 1, -1 do
    if freed - picked[i].gpus >= goal then
      freed = freed - picked[i].gpus
      table.remove(picked, i)
    end
  end
  local asked = 0
  for _, j in ipairs(picked) do
    j.taken = true
    for vt, s in pairs(j.shares) do pool.usage[vt] = pool.usage[vt] - s end
    if j.gid then
      -- every member stops (each checkpoints and goes back to its place, as a job alone); the group's
      -- GPUs come back when the last is out (co_release). `preempting_gpus` 0 on a member: it is being
      -- preempted (a pause then withdrawn restores it) but frees nothing by itself.
      redis.call('HSET', CO_GROUP_PREFIX .. j.gid, 'preempting', int(j.gpus))
      for _, m in ipairs(j.members) do
        redis.call('HSET', JOB_KEY_PREFIX .. m.id, 'control', 'preempt', 'preempting_gpus', 0)
        add_preempting(m.tenant, m.share)
      end
      asked = asked + #j.members
    else
      redis.call('HSET', JOB_KEY_PREFIX .. j.id, 'control', 'preempt', 'preempting_gpus', int(j.gpus))
      hold(j.tenant, j.id, j.gpus, j.gpus)
      add_preempting(j.tenant, j.gpus)
      asked = asked + 1
    end
    redis.call('HINCRBY', CLUSTER, 'incoming', j.gpus)
  end
  return asked, freed
end
-- 4. walk in order: admit the first head that fits; a below-nominal head that does not fit (but would
-- fit the cluster) holds the free capacity and waits for GPUs already being preempted, or preempts for
-- what is missing.
-- The guarded head (above): the free GPUs are held for it (the walk stops there: nothing smaller
-- backfills past it, and no later head preempts for GPUs held) until it fits; without it a gang can
-- wait forever behind a stream of small jobs.
local preempted = 0
local reserved, spoken = 0, 0  -- free GPUs held for waiting reclaimers; incoming GPUs promised to them
for _, c in ipairs(cands) do
  local avail = free - reserved
  local g = c.head.gpus
  if g <= avail then
    local attempt, expires = start_job(c, now, ARGV[1], ARGV[2], ARGV[3])
    if not attempt then return {'retry', preempted} end
    add_usage(c.tenant, g, 1, now)
    emit_job('running', c.tenant, c.head.id)
    return {'claimed', c.head.id, attempt, int(expires), c.tenant, preempted}
  end
  if c.tier <= 1 and c.u < c.q.nominal and g <= total then
    -- allocated above total: a node left with jobs still counted on it; that overcommit is missing too
    local missing = g - avail - (incoming - spoken) + math.max(allocated - total, 0)
    if missing > 0 then
      -- reclaim for the tenant's following jobs within its nominal quota too, in the same wave: it gets
      -- its quota back after one checkpoint + restart, not one per job
      local n, freed = preempt_for(c, missing, missing + within_nominal_after_head(c))
      if n > 0 then
        preempted = preempted + n
        incoming = incoming + freed
      end
    end
    if g <= avail + (incoming - spoken) then
      spoken = spoken + (g - avail)
      reserved = reserved + avail
    end
  end
  if c == guarded then break end  -- nothing backfills past it, and nothing else reclaims
end
return {'none', preempted}
"""

# Co-training (fleet.co_training, docs/scheduling.md#co-training): add one more job to the group the
# running job ARGV[5] leads, without new GPUs. Run after the prelude.
# ARGV: worker_id, lease_ms, claim_token (fresh), clock_ms ('' = Redis's), leader job id, leader attempt,
#       leader claim token, max_members, mem_left (bytes; '' = unchecked), member_fixed_bytes, bytes_per_rank
# A job may join when it is its tenant's queue head (a tenant's own order holds), co-trainable
# (co_training not false, one worker holding one GPU) with the leader's base model and quantization,
# its tenant's borrowing limit admits what its shares may grow back to (this group's whole gpus, unless
# the tenant has a member in it already: tier_of's growth) and its memory estimate
# (member_fixed_bytes + bytes_per_rank × its rank) fits mem_left. A leader with a control request
# pending (preempt, pause, cancel) is stopping: nothing joins it, so that its GPUs come back when it
# stops. Among those, the order is ADMIT's
# (entry_before: within nominal first, lower entry score, fewer GPUs held per weight, priority, age;
# then the starvation guard), tier and entry score counting the head's whole GPUs as admission does. Reads the
# buckets of heads of the group's size (at most CO_JOIN_DEPTH each) and the tenants holding GPUs:
# never the queued jobs.
# A leader asked to stop, or a group being preempted (ADMIT's preempt_for), takes no one.
# Returns {'claimed', job_id, attempt, lease_expires_ms, tenant, group_id}, {'none'}, {'fenced'}
# (the leader's attempt is over) or {'retry'} (a stale index entry, dropped: decide again).
CO_JOIN = r"""
local CO_JOIN_DEPTH = 16
-- The key jobs must share to train in one group, and the job's LoRA rank; nil when it trains alone.
local function co_key(job_key)
  local v = redis.call('HMGET', job_key, 'spec', 'base_model', 'model')
  if not v[1] then return nil end
  local ok, spec = pcall(cjson.decode, v[1])
  if not ok or type(spec) ~= 'table' or spec.co_training == false then return nil end
  local res = spec.resources
  -- one worker on one device: a group trains in one process on one device (workers.cotrain)
  if type(res) ~= 'table' or tonumber(res.workers) ~= 1 or (tonumber(res.gpus_per_worker) or 1) ~= 1 then
    return nil
  end
  local quant = spec.quantization
  if type(quant) ~= 'string' then quant = '' end
  local r = 8
  if type(spec.lora) == 'table' and tonumber(spec.lora.r) then r = tonumber(spec.lora.r) end
  return (v[2] or v[3] or '') .. '|' .. quant .. '|' .. tostring(tonumber(res.gpus_per_worker) or 1), r
end
CLOCK = clock_arg(ARGV[4])
local now = now_ms()
local hl = half_life_ms()
local leader, leader_key = ARGV[5], JOB_KEY_PREFIX .. ARGV[5]
if fence_check(leader_key, ARGV[6], ARGV[7]) then return {'fenced'} end
-- a leader asked to stop (cancel, pause, preemption) takes no one with it; nor does a group being preempted
if redis.call('HGET', leader_key, 'control') then return {'none'} end
local gid = redis.call('HGET', CO_MEMBER_OF, leader)
local key, g, members, mem_left
local inside = {}  -- tenants with a member in the group
if gid then
  local gk = CO_GROUP_PREFIX .. gid
  local v = redis.call('HMGET', gk, 'gpus', 'key', 'mem_left', 'preempting')
  if v[4] then return {'none'} end
  g, key, mem_left = tonumber(v[1]), v[2], num(v[3], nil)
  members = 0
  local flat = redis.call('HGETALL', gk)
  for i = 1, #flat, 2 do
    if string.sub(flat[i], 1, 2) == 'm:' then
      members = members + 1
      inside[string.match(flat[i + 1], '^%d+ (.*)$')] = true
    end
  end
else
  local leader_r
  key, leader_r = co_key(leader_key)
  if not key then return {'none'} end
  g, members, mem_left = num(redis.call('HGET', leader_key, 'gpus'), 1), 1, num(ARGV[9], nil)
  -- the memory terms, where the queue's replay (fleet.queue_replay) reads them to form groups as this does
  if mem_left == nil then
    redis.call('HDEL', CONFIG, 'co_memory:' .. key)
  else
    redis.call('HSET', CONFIG, 'co_memory:' .. key, int(mem_left + ARGV[10] + ARGV[11] * leader_r) .. ' '
               .. int(ARGV[10]) .. ' ' .. int(ARGV[11]))
  end
  inside[redis.call('HGET', leader_key, 'tenant_id')] = true
end
if members >= tonumber(ARGV[8]) then return {'none'} end
local fixed, per_rank = tonumber(ARGV[10]), tonumber(ARGV[11])
local cands = {}
-- A head joins under admission's own order (entry_before, as ADMIT sorts): its tier and entry score
-- count its whole g GPUs, as admission does. Its tenant's borrowing limit must admit what the tenant's
-- shares may grow back to as others leave: all of g, as if admitted alone, on top of the growth of its
-- other groups; a tenant with a member here already may grow to g here however many of its jobs share
-- it (st.growth counts this group already).
local function consider(tenant, st, kind, order_key)
  local q, head = st.q, st.head
  if not head or head.gpus ~= g or (q.max_running ~= nil and st.running >= q.max_running) then return end
  local growth = st.growth
  if inside[tenant] then growth = growth - g end
  local tier = tier_of(q, st.gpus, g, growth)
  if not tier then return end
  local k, r = co_key(JOB_KEY_PREFIX .. head.id)
  if k ~= key then return end
  local cost = fixed + per_rank * r
  if mem_left ~= nil and cost > mem_left then return end
  cands[#cands + 1] = {tenant = tenant, tier = tier, score = head_score(st, now, hl, kind, order_key), u = st.gpus,
                       head = head, q = q, cost = cost}
end
for _, bucket in ipairs(redis.call('ZRANGEBYSCORE', BUCKETS, g, g)) do
  local _, kind = bucket_parts(bucket)
  local m = redis.call('ZRANGE', bucket, 0, CO_JOIN_DEPTH - 1, 'WITHSCORES')
  for j = 1, #m, 2 do consider(m[j], tenant_state(m[j]), kind, tonumber(m[j + 1])) end
end
for _, t in ipairs(redis.call('SMEMBERS', HOLDING)) do consider(t, tenant_state(t)) end
if #cands == 0 then return {'none'} end
table.sort(cands, entry_before)
starvation_guard(cands, math.huge, now, starvation_guard_ms())
local c = cands[1]
local attempt, expires = start_job(c, now, ARGV[1], ARGV[2], ARGV[3])
if not attempt then return {'retry'} end
if not gid then  -- the leader's gang becomes the group's: it holds all of it until the others join
  gid = leader .. '-a' .. ARGV[6]
  local lt = redis.call('HGET', leader_key, 'tenant_id')
  redis.call('HSET', CO_GROUP_PREFIX .. gid, 'gpus', int(g), 'key', key, 'm:' .. leader, int(g * 1000) .. ' ' .. lt)
  redis.call('HSET', CO_MEMBER_OF, leader, gid)
end
local gk = CO_GROUP_PREFIX .. gid
redis.call('HSET', CO_MEMBER_OF, c.head.id, gid)
redis.call('HSET', gk, 'm:' .. c.head.id, '0 ' .. c.tenant)
if not inside[c.tenant] then co_grow(c.tenant, g * 1000) end  -- holds 0 of the g it may grow to (rebalanced next)
if mem_left ~= nil then redis.call('HSET', gk, 'mem_left', int(mem_left - c.cost)) end
add_usage(c.tenant, 0, 1, now, true)
co_rebalance(gid, now)
emit_job('running', c.tenant, c.head.id)
return {'claimed', c.head.id, attempt, int(expires), c.tenant, gid}
"""
