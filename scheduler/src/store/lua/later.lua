-- Timers far ahead wait in hourly lists, not in the due set. A run waiting three days
-- costs a list entry (about its id's length) instead of a sorted-set entry (about 120
-- bytes); the due set holds only what comes due within about two hours.
-- A step due at `due` goes into the list of its hour (`<later>:<hour>`, the hour listed in
-- the `later` sorted set by when it begins) when that hour begins at least the horizon
-- after now; otherwise straight into the due set. Each claim (claim.lua) first moves the
-- lists whose hour begins within the horizon into the due set, so a step is in the due
-- set an hour before it is due.
-- A list entry is not removed when its run moves on (woken by an event, cancelled,
-- finished): when its list is moved, an entry goes into the due set only while its run
-- is active, due within that hour, neither leased nor parked. An active run that is
-- neither leased nor parked is always due at its `due`, so that check is the whole
-- rule, and an entry for a run already in the due set adds nothing (same member, same
-- score).
-- (Prepended to the scripts that schedule steps; see `with_preludes` in store/mod.rs.)
-- Calls `command` on `key` with `values` appended, 2,000 at a time (within Lua's unpack
-- limit; even, so pairs stay whole): one call per batch rather than per run.
local function in_chunks(command, key, values)
  for n = 1, #values, 2000 do
    redis.call(command, key, unpack(values, n, math.min(n + 1999, #values)))
  end
end

local LATER_HOUR_MS = 3600000
local LATER_HORIZON_MS = 3600000
local later_lists = {}

-- Schedules run `id` at `due` (ms): appends `due, id` to `scheduled` (for one ZADD of the
-- due set) or to the list of its hour (written by write_later()).
local function schedule(scheduled, now, due, id)
  local hour = math.floor(tonumber(due) / LATER_HOUR_MS)
  if hour * LATER_HOUR_MS >= now + LATER_HORIZON_MS then
    local ids = later_lists[hour]
    if not ids then
      ids = {}
      later_lists[hour] = ids
    end
    ids[#ids + 1] = id
  else
    scheduled[#scheduled + 1] = due
    scheduled[#scheduled + 1] = id
  end
end

-- Writes what schedule() put in hourly lists: one RPUSH per list and the hour in the
-- `later` set.
local function write_later(later)
  for hour, ids in pairs(later_lists) do
    local list = later .. ':' .. string.format('%d', hour)
    in_chunks('RPUSH', list, ids)
    redis.call('ZADD', later, hour * LATER_HOUR_MS, string.format('%d', hour))
  end
end

-- Moves entries of the lists whose hour begins within the horizon into the due set, at
-- most `budget` of them (a few ms of Redis per thousand); returns true when entries are
-- left to move at once.
local function promote(due_set, lease, later, runs, paused_prefix, now, budget)
  local hours = redis.call('ZRANGEBYSCORE', later, '-inf', '(' .. (now + LATER_HORIZON_MS), 'LIMIT', 0, 16)
  for _, hour in ipairs(hours) do
    if budget <= 0 then
      return true
    end
    local list = later .. ':' .. hour
    local ids = redis.call('LPOP', list, budget)
    if ids then
      budget = budget - #ids
      local start = tonumber(hour) * LATER_HOUR_MS
      local moved = {}
      for _, id in ipairs(ids) do
        local run = redis.call('HMGET', runs .. id, 'st', 'due', 'pb')
        local due = tonumber(run[2] or '')
        if run[1] == 'active' and due and due >= start and due < start + LATER_HOUR_MS
            and not redis.call('ZSCORE', lease, id)
            and not redis.call('ZSCORE', paused_prefix .. run[3], id) then
          moved[#moved + 1] = due
          moved[#moved + 1] = id
        end
      end
      in_chunks('ZADD', due_set, moved)
    end
    if redis.call('EXISTS', list) == 0 then
      redis.call('ZREM', later, hour)
    else
      return true
    end
  end
  return false
end
