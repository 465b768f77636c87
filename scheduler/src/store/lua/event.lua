-- Records an event of one contact, atomically with respect to the contact's runs:
-- ends the runs whose goal it is (converted), wakes the runs waiting for it in a
-- wait_for, and keeps it in the contact's short lookback (for a wait_for registered
-- just after). Entry playbooks are started by the caller afterwards.
-- KEYS[1] due set, KEYS[2] lease set, KEYS[3] later set, KEYS[4] (optional) request key
-- ARGV[1] run key prefix, ARGV[2] contact id, ARGV[3] event name, ARGV[4] now ms,
-- ARGV[5] lookback ms, ARGV[6] lookback length, ARGV[7] request ttl (s),
-- ARGV[8] retention of finished runs (s), ARGV[9] stats prefix, ARGV[10] waits prefix,
-- ARGV[11] goals prefix, ARGV[12] event lookback prefix, ARGV[13] paused-runs prefix,
-- ARGV[14] the event as JSON (`ev` of woken runs).
-- Returns {duplicate (0|1), woken run ids, converted run ids}.
if #KEYS == 4 and redis.call('EXISTS', KEYS[4]) == 1 then
  return {1, {}, {}}
end
local runs, contact, event, now = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local stats_prefix, waits, goals = ARGV[9], ARGV[10] .. contact, ARGV[11] .. contact
local lookback, paused_prefix = ARGV[12] .. contact, ARGV[13]
local woken, converted = {}, {}
local scheduled = {}
local function append(key, line)
  local timeline = redis.call('HGET', key, 't')
  if timeline then
    return timeline .. '\n' .. line
  end
  return line
end
-- Where an unleased active run sits: parked while its playbook is paused, or due (in
-- the due set, or in an hourly list of later.lua, whose entry stays and is skipped once
-- the run has moved on).
local function unschedule(id, playbook)
  if redis.call('ZREM', paused_prefix .. playbook, id) == 1 then
    return paused_prefix .. playbook
  end
  redis.call('ZREM', KEYS[1], id)
  return KEYS[1]
end

-- Goals first: a converted run is not woken as well.
local goal_runs = redis.call('HGETALL', goals)
for n = 1, #goal_runs, 2 do
  local id, goal = goal_runs[n], goal_runs[n + 1]
  if goal == event then
    local key = runs .. id
    local run = redis.call('HMGET', key, 'st', 'pb', 'v', 'i', 'due', 'a')
    if run[1] == 'active' then
      redis.call('ZREM', KEYS[2], id)
      unschedule(id, run[2])
      redis.call('HINCRBY', key, 'f', 1)
      local line = '{"i":' .. run[4] .. ',"s":"cancelled","a":0,"due":' .. (run[5] or now) ..
        ',"at":' .. now .. ',"d":"goal reached: ' .. event .. '"}'
      redis.call('HSET', key, 'st', 'converted', 'ua', now, 'd', 'goal reached: ' .. event, 't', append(key, line))
      redis.call('EXPIRE', key, ARGV[8])
      redis.call('HDEL', waits, id)
      local stats = stats_prefix .. run[2] .. ':' .. run[3]
      redis.call('HINCRBY', stats, 'runs:converted', 1)
      redis.call('HINCRBY', stats, run[4] .. ':left', 1)
      converted[#converted + 1] = id
      redis.call('HDEL', goals, id)
    elseif run[1] ~= 'failed' then
      -- (A failed run keeps its goal while it is a dead letter, for when it is retried.)
      redis.call('HDEL', goals, id)
    end
  end
end

local waiting = redis.call('HGETALL', waits)
for n = 1, #waiting, 2 do
  local id, registration = waiting[n], waiting[n + 1]
  -- "<event> <step index> <op> <index> <delay ms>"
  local parts = {}
  for part in string.gmatch(registration, '%S+') do
    parts[#parts + 1] = part
  end
  if parts[1] == event then
    local key = runs .. id
    local run = redis.call('HMGET', key, 'st', 'pb', 'v', 'i', 'due', 'ws')
    if run[1] ~= 'active' or run[4] ~= parts[2] or run[6] ~= parts[2] then
      -- Stale: the run moved on or ended.
      redis.call('HDEL', waits, id)
    elseif not redis.call('ZSCORE', KEYS[2], id) then
      -- (A leased run is timing out right now: the timeout wins, its entry goes then.)
      local set = unschedule(id, run[2])
      redis.call('HDEL', waits, id)
      local op, index, due = parts[3], parts[4], now + tonumber(parts[5])
      local line = '{"i":' .. run[4] .. ',"s":"done","a":0,"due":' .. (run[5] or now) ..
        ',"at":' .. now .. ',"d":"' .. event .. ' arrived"}'
      local stats = stats_prefix .. run[2] .. ':' .. run[3]
      redis.call('HINCRBY', stats, run[4] .. ':done', 1)
      redis.call('HINCRBY', key, 'f', 1)
      if op == 'finish' then
        redis.call('HSET', key, 'st', 'completed', 'ua', now, 'i', index, 'd', '', 'ev', ARGV[14], 't', append(key, line))
        redis.call('EXPIRE', key, ARGV[8])
        redis.call('HDEL', goals, id)
        redis.call('HINCRBY', stats, 'runs:completed', 1)
      else
        redis.call('HSET', key, 'i', index, 'a', 1, 'due', due, 'ua', now, 'd', '', 'ev', ARGV[14], 't', append(key, line))
        if set == KEYS[1] then
          schedule(scheduled, now, due, id)
        else
          redis.call('ZADD', set, due, id)
        end
        redis.call('HINCRBY', stats, index .. ':in', 1)
      end
      woken[#woken + 1] = id
    end
  end
end

redis.call('LPUSH', lookback, now .. ' ' .. event .. ' ' .. ARGV[14])
redis.call('LTRIM', lookback, 0, tonumber(ARGV[6]) - 1)
redis.call('PEXPIRE', lookback, ARGV[5])
if #KEYS == 4 then
  redis.call('SET', KEYS[4], '1', 'EX', ARGV[7])
end
in_chunks('ZADD', KEYS[1], scheduled)
write_later(KEYS[3])
return {0, woken, converted}
