-- Claims due steps of one partition: moves the hourly lists of timers coming within the
-- horizon into the due set (later.lua), returns expired leases to due (their attempt
-- counted, their fencing token moved on), then moves up to `limit` due runs into the
-- lease set under their fencing token and returns what the scheduler needs to act on
-- them. A run's `f` is the token of its next hand-out: it moves on whenever an attempt
-- ends (outcome recorded, lease expired, run cancelled or woken), so claiming writes
-- nothing to the run.
-- A run at the end of a wait whose next step is due at once (`wn` = "<wait index> <next
-- index>", written when the wait began) is moved straight on: the wait recorded done in
-- its timeline and funnel, the run claimed at the next step, in this one call.
-- Ahead (horizon ARGV[8] later than now): claims instead the runs due after now and by
-- then that end a wait there and go on to one of the eligible steps (ARGV[9..],
-- "<playbook> <version> <index>"), the others left due; their lease runs until a lease
-- after their due time, and their wait ends at its due time.
-- KEYS[1] due set, KEYS[2] lease set, KEYS[3] later set
-- ARGV[1] now ms, ARGV[2] limit, ARGV[3] lease ms, ARGV[4] run key prefix, ARGV[5] contact key
-- prefix, ARGV[6] stats prefix, ARGV[7] paused-runs prefix, ARGV[8] horizon ms (optional),
-- ARGV[9..] eligible steps
-- Returns {claimed, expired count, next due ms or '' (now while hourly lists are left to
-- move), next lease deadline or ''};
-- each claimed entry is {run id, fence, playbook, version, contact id, step index,
-- attempt, traceparent, due ms, contact field/value list, {waiting step ('ws': the
-- step a wait_until / wait_for was scheduled at, or ''), created ms, trigger event JSON,
-- resume state ('rs': what an earlier attempt of the step saved with TaskProgress, or '')}}.
local now = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local lease = tonumber(ARGV[3])
local runs = ARGV[4]
local horizon = tonumber(ARGV[8] or ARGV[1])
local ahead = horizon > now
local eligible = {}
for n = 9, #ARGV do
  eligible[ARGV[n]] = true
end

local more_later = promote(KEYS[1], KEYS[2], KEYS[3], runs, ARGV[7], now, 1000)

local expired = {}
if not ahead then
  expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)
end
for _, id in ipairs(expired) do
  if redis.call('EXISTS', runs .. id) == 1 then
    redis.call('ZADD', KEYS[1], now, id)
    redis.call('HINCRBY', runs .. id, 'a', 1)
    redis.call('HINCRBY', runs .. id, 'f', 1)
    redis.call('HSET', runs .. id, 'd', 'lease expired before the worker reported')
  end
end
if #expired > 0 then
  redis.call('ZREM', KEYS[2], unpack(expired))
end

local due
if ahead then
  -- Ineligible runs stay due: look a few batches deep past them.
  due = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, horizon, 'WITHSCORES', 'LIMIT', 0, limit * 4)
else
  due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
end
local ids = {}
local claimed = {}
local leased = {}
for n = 1, #due, 2 do
  if #claimed >= limit then
    break
  end
  local id = due[n]
  local at = math.max(tonumber(due[n + 1]), now)
  local key = runs .. id
  local run = redis.call('HMGET', key, 'st', 'pb', 'v', 'c', 'i', 'a', 'tp', 'due', 'ws', 'ca', 'ev', 'rs', 'f', 'wn', 't')
  -- The wait this run ends and the step it moves on to, if it does (see above).
  local wait, next_index
  if run[1] == 'active' and run[14] then
    local space = string.find(run[14], ' ', 1, true)
    -- (Runs only move forward, so once the run has left the wait its `wn` names a step
    -- it is not at: kept, and ignored.)
    if space and string.sub(run[14], 1, space - 1) == run[5] then
      wait, next_index = run[5], string.sub(run[14], space + 1)
    end
  end
  -- Ahead, only the end of a wait: a step due again after a retry, a busy worker or a
  -- rate limit waits for its time in Redis, for whichever worker is free then.
  local take = run[1] ~= 'active' or not ahead or
    (wait ~= nil and eligible[run[2] .. ' ' .. run[3] .. ' ' .. next_index])
  if take then
    ids[#ids + 1] = id
  end
  if take and wait then
    local line = '{"i":' .. wait .. ',"s":"done","a":0,"due":' .. (run[8] or at) ..
      ',"at":' .. at .. '}'
    local timeline = run[15] and (run[15] .. '\n' .. line) or line
    redis.call('HSET', key, 'i', next_index, 'a', 1, 'ua', at, 'd', '', 't', timeline)
    local stats = ARGV[6] .. run[2] .. ':' .. run[3]
    count(stats, wait .. ':done')
    count(stats, next_index .. ':in')
    run[5], run[6] = next_index, '1'
  end
  if take and run[1] == 'active' then
    local fence = tonumber(run[13] or '1')
    leased[#leased + 1] = at + lease
    leased[#leased + 1] = id
    local contact = redis.call('HGETALL', ARGV[5] .. run[4])
    claimed[#claimed + 1] = {id, fence, run[2], run[3], run[4], run[5], run[6], run[7], run[8], contact,
      {run[9] or '', run[10] or '0', run[11] or '', run[12] or ''}}
  end
end
if #ids > 0 then
  redis.call('ZREM', KEYS[1], unpack(ids))
end
-- One ZADD for the batch (in chunks, within Lua's unpack limit).
in_chunks('ZADD', KEYS[2], leased)

write_counts()

local next_due = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local next_lease = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if more_later then
  next_due = {'', ARGV[1]}
end
return {claimed, #expired, next_due[2] or '', next_lease[2] or ''}
