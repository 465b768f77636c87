-- Applies a batch of outcomes for leased runs of one partition. An outcome counts
-- only while its run is active and still holds the same fencing token (`f`, which
-- moves on whenever an attempt ends: an outcome recorded, a lease expired, the run
-- cancelled); a stale one is ignored and counted, as is a second outcome for the same
-- run in one batch (a worker that re-attached may report a result twice).
-- With a lease time (ARGV[10]), a run whose next step is due now is leased again at
-- once and returned like claim.lua returns it, so a chain of steps costs one script
-- call per step rather than a completion and a claim.
-- KEYS[1] due set, KEYS[2] lease set, KEYS[3] dead-letter set, KEYS[4] later set
-- ARGV[1] run key prefix, ARGV[2] now ms, ARGV[3] retention of finished runs (s),
-- ARGV[4] prefix of the per-playbook dead-letter sets, ARGV[5] stats prefix,
-- ARGV[6] waits prefix, ARGV[7] goals prefix, ARGV[8] event lookback prefix,
-- ARGV[9] paused-runs prefix, ARGV[10] lease ms ('' = lease nothing), ARGV[11] contact
-- key prefix, ARGV[12] prefix of the per-contact send sets (spend.lua),
-- then per outcome 16 values:
--   id, fence, op, index, due, attempt, status, detail, timeline line, dead ('1'),
--   stat (funnel counter of the step being left or held: done, skipped, capped, failed,
--   timed_out, deferred, or ''), unwait ('1': the run leaves a wait_for),
--   wait event ('' for none), and where the run goes when that event comes, packed as
--   "<op> <index> <delay ms>" (op 'next' or 'finish'; due = the event's time + delay);
--   without a wait event, for a 'next' to a wait or a 'hold' of a wait_until, the step
--   index the run goes straight on to when the wait ends (stored as `wn`, see claim.lua);
--   then a send to uncount from the contact's caps ('' for none: the member spend.lua
--   counted) and its channel (it leaves the `*` and the channel's send sets).
-- ops: 'next' / 'retry' schedule step `index` at `due` with `attempt`; 'finish' ends the
-- run with `status` and sets its expiry, except for a dead letter, which is kept until
-- retried; 'hold' keeps the run at its step (a wait_until or wait_for now waiting),
-- due at `due`, recording the step in `ws`; with a wait event it registers the run as
-- waiting for it, unless the contact's lookback already holds that event since the run
-- started: then the run goes on at once by the matched op, with `timeline line`;
-- 'park' moves a run of a paused playbook aside, keeping its due time.
-- The step's resume state (`rs`, saved by TaskProgress) goes when the run leaves the
-- step ('next', 'finish'); a 'retry' keeps it for the next attempt.
-- Returns {applied, stale, claimed (as claim.lua's)}.
local runs, now, retention = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local lease_ms, contacts, sent_prefix = tonumber(ARGV[10]), ARGV[11], ARGV[12]
local claimed, leased, scheduled = {}, {}, {}
local dead_by_playbook, stats_prefix = ARGV[4], ARGV[5]
local waits_prefix, goals_prefix, events_prefix, paused_prefix = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local applied, stale = 0, 0
local released = {}
local seen = {}
local function append(timeline, line)
  if line == '' then
    return nil
  end
  if timeline then
    return timeline .. '\n' .. line
  end
  return line
end
local function finish(key, id, run, status, fields, dead)
  fields[#fields + 1] = 'st'
  fields[#fields + 1] = status
  redis.call('HSET', key, unpack(fields))
  if dead then
    redis.call('ZADD', KEYS[3], now, id)
    redis.call('ZADD', dead_by_playbook .. (run[3] or ''), now, id)
  else
    redis.call('EXPIRE', key, retention)
  end
  -- A dead letter keeps its goal: retried, its goal event still converts it.
  if run[7] == '1' and not dead then
    redis.call('HDEL', goals_prefix .. run[5], id)
  end
  count(stats_prefix .. run[3] .. ':' .. run[4], 'runs:' .. status)
end
-- When a run was created (ms): the UUIDv7 timestamp its id is made of, the top 48 of
-- its 128 bits (22 base62 digits, summed exactly in 24-bit limbs; or the first 12 of
-- the 32 hex digits of earlier ids). Runs no longer store it (`ca` of earlier runs).
local base62 = '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'
local function created_of(id)
  local dash = string.find(id, '-', 1, true)
  local digits = dash and string.sub(id, 1, dash - 1) or id
  if #digits == 32 then
    return tonumber(string.sub(digits, 1, 12), 16)
  end
  local limbs = {0, 0, 0, 0, 0, 0}
  for n = 1, #digits do
    local carry = (string.find(base62, string.sub(digits, n, n), 1, true) or 1) - 1
    for k = 1, 6 do
      local value = limbs[k] * 62 + carry
      limbs[k] = value % 16777216
      carry = math.floor(value / 16777216)
    end
  end
  -- Bits 80..127: limb 4 holds bits 72..95, limb 5 96..119, limb 6 120..143.
  return math.floor(limbs[4] / 256) + limbs[5] * 65536 + limbs[6] * 1099511627776
end
for i = 13, #ARGV, 16 do
  local id = ARGV[i]
  local key = runs .. id
  local run = redis.call('HMGET', key, 'f', 't', 'pb', 'v', 'c', 'i', 'g', 'ca', 'rs', 'st', 'tp', 'ev', 'ws')
  if not seen[id] and run[10] == 'active' and run[1] == ARGV[i + 1] then
    seen[id] = true
    released[#released + 1] = id
    local op, index, due = ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
    if op == 'hold' or op == 'park' then
      index = run[6]
    end
    local stats = stats_prefix .. run[3] .. ':' .. run[4]
    local stat, line = ARGV[i + 10], ARGV[i + 8]
    if ARGV[i + 14] ~= '' then
      local sent = sent_prefix .. run[5] .. '|'
      redis.call('ZREM', sent .. '*', ARGV[i + 14])
      redis.call('ZREM', sent .. ARGV[i + 15], ARGV[i + 14])
    end
    if ARGV[i + 11] == '1' then
      redis.call('HDEL', waits_prefix .. run[5], id)
    end
    if op == 'hold' and ARGV[i + 12] ~= '' then
      -- A wait_for: did the event come already, since the run started?
      local event, since = ARGV[i + 12], tonumber(run[8] or created_of(id))
      -- Lookback items are "<ms> <name> <event JSON>".
      local matched = nil
      for _, item in ipairs(redis.call('LRANGE', events_prefix .. run[5], 0, -1)) do
        local first = string.find(item, ' ')
        local second = first and string.find(item, ' ', first + 1)
        if second and string.sub(item, first + 1, second - 1) == event
            and tonumber(string.sub(item, 1, first - 1)) >= since then
          matched = string.sub(item, second + 1)
          break
        end
      end
      if matched then
        local packed = ARGV[i + 13]
        local a, b = string.find(packed, ' ')
        local c = string.find(packed, ' ', b + 1)
        op = string.sub(packed, 1, a - 1)
        index = string.sub(packed, b + 1, c - 1)
        due = now + tonumber(string.sub(packed, c + 1))
        stat = 'done'
        redis.call('HSET', key, 'ev', matched)
        run[12] = matched
      else
        line = ''
        redis.call('HSET', waits_prefix .. run[5], id, event .. ' ' .. run[6] .. ' ' .. ARGV[i + 13])
      end
    elseif op == 'hold' then
      line = ''
    end
    if stat ~= '' then
      count(stats, run[6] .. ':' .. stat)
    end
    if run[9] and (op == 'next' or op == 'finish') then
      redis.call('HDEL', key, 'rs')
    end
    local fence = tonumber(run[1]) + 1
    local fields = {'ua', now, 'd', ARGV[i + 7], 'i', index, 'f', fence}
    local timeline = append(run[2], line)
    if timeline then
      fields[#fields + 1] = 't'
      fields[#fields + 1] = timeline
    end
    if op == 'finish' then
      finish(key, id, run, ARGV[i + 6] ~= '' and ARGV[i + 6] or 'completed', fields, ARGV[i + 9] == '1')
    elseif op == 'park' then
      redis.call('HSET', key, unpack(fields))
      redis.call('ZADD', paused_prefix .. run[3], due, id)
    else
      fields[#fields + 1] = 'a'
      fields[#fields + 1] = op == 'retry' and ARGV[i + 5] or 1
      fields[#fields + 1] = 'due'
      fields[#fields + 1] = due
      if op == 'hold' then
        fields[#fields + 1] = 'ws'
        fields[#fields + 1] = run[6]
      end
      if ARGV[i + 12] == '' and ARGV[i + 13] ~= '' then
        -- A wait (or a wait_until now holding): the step after it, which the claim at
        -- the wait's end moves the run straight on to (claim.lua).
        fields[#fields + 1] = 'wn'
        fields[#fields + 1] = index .. ' ' .. ARGV[i + 13]
      end
      redis.call('HSET', key, unpack(fields))
      if op == 'next' and lease_ms and tonumber(due) <= now then
        leased[#leased + 1] = now + lease_ms
        leased[#leased + 1] = id
        local contact = redis.call('HGETALL', contacts .. run[5])
        claimed[#claimed + 1] = {id, fence, run[3], run[4], run[5], tonumber(index), 1, run[11] or '', due,
          contact, {run[13] or '', run[8] or '0', run[12] or '', ''}}
      else
        schedule(scheduled, now, due, id)
      end
      if op == 'next' then
        count(stats, index .. ':in')
      end
    end
    applied = applied + 1
  else
    stale = stale + 1
  end
end
if #released > 0 then
  redis.call('ZREM', KEYS[2], unpack(released))
end
-- One ZADD per set for the batch (in chunks, within Lua's unpack limit); leases after
-- the ZREM above, which released every applied run.
in_chunks('ZADD', KEYS[1], scheduled)
in_chunks('ZADD', KEYS[2], leased)
write_later(KEYS[4])
write_counts()
return {applied, stale, claimed}
