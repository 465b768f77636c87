-- Starts a run: upserts the contact (and its tag index), checks the playbook's reentry
-- rule for the contact, writes the run, registers its goal, schedules its first step and
-- counts it in the funnel.
-- KEYS[1] run hash, KEYS[2] due set, KEYS[3] contact hash, KEYS[4] (optional) request key
-- ARGV[1] run id, ARGV[2] due ms, ARGV[3] request ttl (s), ARGV[4] now ms,
-- ARGV[5] playbook name, ARGV[6] reentry: 'never' | 'always' | ms to wait ('after'),
-- ARGV[7] goals hash of the contact ('' when the playbook has no goal), ARGV[8] goal event,
-- ARGV[9] stats hash, ARGV[10] first step index, ARGV[11] tag set prefix,
-- ARGV[12] contact id, ARGV[13] number of tags, ARGV[14] number of run field pairs,
-- then the tags, the run's field/value pairs, the contact's field/value pairs.
-- Returns {code, run id, detail}: 1 started; 0 the request id had started run id;
-- 2 refused by reentry (run id: the contact's last run of the playbook).
if #KEYS == 4 then
  local existing = redis.call('GET', KEYS[4])
  if existing then
    return {0, existing, ''}
  end
end
local now = tonumber(ARGV[4])
local tags = tonumber(ARGV[13])
local run_start = 15 + tags
local run_end = run_start - 1 + 2 * tonumber(ARGV[14])
-- The contact is upserted whether or not a run starts.
if #ARGV > run_end then
  redis.call('HSET', KEYS[3], unpack(ARGV, run_end + 1, #ARGV))
end
for n = 15, 14 + tags do
  redis.call('SADD', ARGV[11] .. ARGV[n], ARGV[12])
end
local entered_field = 'e:' .. ARGV[5]
local entered = redis.call('HGET', KEYS[3], entered_field)
if entered and ARGV[6] ~= 'always' then
  local space = string.find(entered, ' ')
  local at = tonumber(string.sub(entered, 1, space - 1))
  local last = string.sub(entered, space + 1)
  if ARGV[6] == 'never' then
    return {2, last, 'reentry: never (the contact entered this playbook before)'}
  end
  local wait = tonumber(ARGV[6])
  if now - at < wait then
    return {2, last, 'reentry: after ' .. math.floor(wait / 1000) .. 's (the contact entered ' ..
      math.floor((now - at) / 1000) .. 's ago)'}
  end
end
redis.call('HSET', KEYS[1], unpack(ARGV, run_start, run_end))
redis.call('HSET', KEYS[3], entered_field, now .. ' ' .. ARGV[1])
if ARGV[7] ~= '' then
  redis.call('HSET', ARGV[7], ARGV[1], ARGV[8])
end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('HINCRBY', ARGV[9], 'runs:in', 1)
redis.call('HINCRBY', ARGV[9], ARGV[10] .. ':in', 1)
if #KEYS == 4 then
  redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[3])
end
return {1, ARGV[1], ''}
