-- Cancels an active run: unschedules it, fences out any worker holding its step.
-- KEYS[1] due set, KEYS[2] lease set, KEYS[3] run hash
-- ARGV[1] run id, ARGV[2] now ms, ARGV[3] retention (s), ARGV[4] timeline line
-- Returns 1 when cancelled, 0 when the run is missing or already finished.
if redis.call('HGET', KEYS[3], 'st') ~= 'active' then
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[3], 'f', 1)
local timeline = redis.call('HGET', KEYS[3], 't')
local line = ARGV[4]
if timeline then
  line = timeline .. '\n' .. line
end
redis.call('HSET', KEYS[3], 'st', 'cancelled', 'ua', ARGV[2], 't', line, 'd', 'cancelled')
redis.call('EXPIRE', KEYS[3], ARGV[3])
return 1
