-- Cancels an active run: unschedules it (due, parked or waiting for an event), fences
-- out any worker holding its step, and counts it in the funnel.
-- KEYS[1] due set, KEYS[2] lease set, KEYS[3] run hash
-- ARGV[1] run id, ARGV[2] now ms, ARGV[3] retention (s), ARGV[4] timeline line,
-- ARGV[5] paused-runs prefix, ARGV[6] waits prefix, ARGV[7] goals prefix, ARGV[8] stats prefix,
-- ARGV[9] only at this step index ('' for any).
-- Returns 1 when cancelled, 0 when the run is missing, already finished, or elsewhere.
local run = redis.call('HMGET', KEYS[3], 'st', 'pb', 'v', 'c', 'i', 't')
if run[1] ~= 'active' or (ARGV[9] ~= '' and run[5] ~= ARGV[9]) then
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', ARGV[5] .. run[2], ARGV[1])
redis.call('HDEL', ARGV[6] .. run[4], ARGV[1])
redis.call('HDEL', ARGV[7] .. run[4], ARGV[1])
redis.call('HINCRBY', KEYS[3], 'f', 1)
local line = ARGV[4]
if run[6] then
  line = run[6] .. '\n' .. line
end
redis.call('HSET', KEYS[3], 'st', 'cancelled', 'ua', ARGV[2], 't', line, 'd', 'cancelled')
redis.call('EXPIRE', KEYS[3], ARGV[3])
local stats = ARGV[8] .. run[2] .. ':' .. run[3]
redis.call('HINCRBY', stats, 'runs:cancelled', 1)
redis.call('HINCRBY', stats, run[5] .. ':left', 1)
return 1
