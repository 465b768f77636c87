-- Skips missed ticks of a recurring playbook: moves `last` from `old` to the newest
-- skipped tick and counts them, unless a tick is being worked or `last` moved meanwhile
-- (another scheduler got there first).
-- KEYS[1] schedule hash
-- ARGV[1] old last ms, ARGV[2] newest skipped tick ms, ARGV[3] number of ticks skipped
-- Returns 1 when skipped, 0 otherwise.
if redis.call('HEXISTS', KEYS[1], 'current') == 1 then
  return 0
end
if redis.call('HGET', KEYS[1], 'last') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'last', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'skipped', ARGV[3])
return 1
