-- Records its owner's progress on a tick: the next partition to work, the enrollments of
-- the page just worked, and a renewed lease; when `done`, the end of the tick (the
-- schedule's `last` moves to it and `current` is cleared).
-- KEYS[1] schedule hash, KEYS[2] tick hash
-- ARGV[1] owner, ARGV[2] lease deadline ms, ARGV[3] next partition, ARGV[4] enrolled,
-- ARGV[5] already enrolled, ARGV[6] refused, ARGV[7] '1' when done, ARGV[8] tick ms,
-- ARGV[9] now ms
-- Returns {1, enrolled, already, refused} (the tick's totals), or {0} when another
-- scheduler took the tick over (the caller stops working on it).
if redis.call('HGET', KEYS[2], 'owner') ~= ARGV[1] then
  return {0}
end
redis.call('HSET', KEYS[2], 'cursor', ARGV[3], 'lease', ARGV[2])
local enrolled = redis.call('HINCRBY', KEYS[2], 'enrolled', ARGV[4])
local already = redis.call('HINCRBY', KEYS[2], 'already', ARGV[5])
local refused = redis.call('HINCRBY', KEYS[2], 'refused', ARGV[6])
if ARGV[7] == '1' then
  redis.call('HSET', KEYS[2], 'done', ARGV[9])
  local last = redis.call('HGET', KEYS[1], 'last')
  if not last or tonumber(last) < tonumber(ARGV[8]) then
    redis.call('HSET', KEYS[1], 'last', ARGV[8])
  end
  if redis.call('HGET', KEYS[1], 'current') == ARGV[8] then
    redis.call('HDEL', KEYS[1], 'current')
  end
end
return {1, enrolled, already, refused}
