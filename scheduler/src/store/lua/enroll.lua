-- Starts a batch of runs in one partition, in order. For each: upserts the contact (and
-- its tag index), checks the playbook's reentry rule for the contact, writes the run,
-- lists it under its playbook, registers its goal, schedules its first step and counts
-- it in the funnel.
-- KEYS[1] due set, KEYS[2] later set
-- ARGV[1] now ms, ARGV[2] request ttl (s), ARGV[3] run key prefix, ARGV[4] contact key
-- prefix, ARGV[5] request key prefix, ARGV[6] goals prefix, ARGV[7] tag set prefix,
-- ARGV[8] playbook-runs prefix, ARGV[9] stats prefix,
-- then per run a header of 12 values: run id, due ms, request id ('' for none),
-- playbook name, reentry ('never' | 'always' | ms to wait for 'after'), goal event (''
-- for none), playbook version, first step index, contact id, number of tags, number of
-- run field/value pairs, number of contact field/value pairs; then the tags, the run's
-- pairs and the contact's pairs.
-- Returns one {code, run id, detail} per run: 1 started; 0 the request id had started
-- run id; 2 refused by reentry (run id: the contact's last run of the playbook).
local now, ttl = tonumber(ARGV[1]), ARGV[2]
local runs, contacts, requests, goals = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local tag_prefix, listed, stats_prefix = ARGV[7], ARGV[8], ARGV[9]
local results = {}
local scheduled = {}

local function enroll(i)
  local id, due, request, playbook = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local reentry, goal, version, first = ARGV[i + 4], ARGV[i + 5], ARGV[i + 6], ARGV[i + 7]
  local contact_id = ARGV[i + 8]
  local tags, run_pairs, contact_pairs = tonumber(ARGV[i + 9]), tonumber(ARGV[i + 10]), tonumber(ARGV[i + 11])
  local tags_at = i + 12
  local run_at = tags_at + tags
  local contact_at = run_at + 2 * run_pairs
  local next_run = contact_at + 2 * contact_pairs
  if request ~= '' then
    local existing = redis.call('GET', requests .. request)
    if existing then
      return next_run, {0, existing, ''}
    end
  end
  local contact = contacts .. contact_id
  for n = tags_at, run_at - 1 do
    redis.call('SADD', tag_prefix .. ARGV[n], contact_id)
  end
  -- The contact is upserted whether or not a run starts; with the run, in the same
  -- HSET as the playbook it entered.
  -- (Contact fields are `id`, `tz`, `a:`, `t:`, `i:`: never an `e:` one.)
  local function upsert(field, value)
    if field then
      redis.call('HSET', contact, field, value, unpack(ARGV, contact_at, next_run - 1))
    elseif next_run > contact_at then
      redis.call('HSET', contact, unpack(ARGV, contact_at, next_run - 1))
    end
  end
  local entered_field = 'e:' .. playbook
  local entered = reentry ~= 'always' and redis.call('HGET', contact, entered_field)
  if entered then
    local space = string.find(entered, ' ')
    local at = tonumber(string.sub(entered, 1, space - 1))
    local last = string.sub(entered, space + 1)
    if reentry == 'never' then
      upsert()
      return next_run, {2, last, 'reentry: never (the contact entered this playbook before)'}
    end
    local wait = tonumber(reentry)
    if now - at < wait then
      upsert()
      return next_run, {2, last, 'reentry: after ' .. math.floor(wait / 1000) .. 's (the contact entered ' ..
        math.floor((now - at) / 1000) .. 's ago)'}
    end
  end
  redis.call('HSET', runs .. id, unpack(ARGV, run_at, contact_at - 1))
  upsert(entered_field, now .. ' ' .. id)
  if goal ~= '' then
    redis.call('HSET', goals .. contact_id, id, goal)
  end
  redis.call('XADD', listed .. playbook, '*', 'r', id)
  schedule(scheduled, now, due, id)
  local stats = stats_prefix .. playbook .. ':' .. version
  count(stats, 'runs:in')
  count(stats, first .. ':in')
  if request ~= '' then
    redis.call('SET', requests .. request, id, 'EX', ttl)
  end
  return next_run, {1, id, ''}
end

local i = 10
while i <= #ARGV do
  local result
  i, result = enroll(i)
  results[#results + 1] = result
end
-- One ZADD for the batch.
in_chunks('ZADD', KEYS[1], scheduled)
write_later(KEYS[2])
write_counts()
return results
