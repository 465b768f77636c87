-- Starts a run: upserts the contact, writes the run, schedules its first step.
-- KEYS[1] run hash, KEYS[2] due set, KEYS[3] contact hash, KEYS[4] (optional) request key
-- ARGV[1] run id, ARGV[2] due ms, ARGV[3] request ttl (s), ARGV[4] number of run field pairs,
-- then the run's field/value pairs, then the contact's field/value pairs.
-- Returns {created (0|1), run id}.
if #KEYS == 4 then
  local existing = redis.call('GET', KEYS[4])
  if existing then
    return {0, existing}
  end
end
local run_end = 4 + 2 * tonumber(ARGV[4])
redis.call('HSET', KEYS[1], unpack(ARGV, 5, run_end))
if #ARGV > run_end then
  redis.call('HSET', KEYS[3], unpack(ARGV, run_end + 1, #ARGV))
end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
if #KEYS == 4 then
  redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[3])
end
return {1, ARGV[1]}
