-- Claims one tick of a recurring playbook for a scheduler, under a lease. A playbook's
-- ticks are worked one at a time, oldest first: its schedule hash holds `last` (ticks at
-- or before it are handled or skipped) and `current` (the tick being worked).
-- KEYS[1] schedule hash, KEYS[2] tick hash
-- ARGV[1] tick ms, ARGV[2] owner, ARGV[3] now ms, ARGV[4] lease deadline ms,
-- ARGV[5] tick hash ttl (s)
-- Returns {1, cursor}: claimed, work on from partition `cursor`;
-- {0, owner, lease deadline}: another scheduler holds the tick;
-- {2}: the tick is handled already; {3, current}: another tick is being worked.
local last = redis.call('HGET', KEYS[1], 'last')
local current = redis.call('HGET', KEYS[1], 'current')
if last and tonumber(ARGV[1]) <= tonumber(last) then
  if current == ARGV[1] then
    redis.call('HDEL', KEYS[1], 'current')
  end
  return {2}
end
if current and current ~= ARGV[1] then
  return {3, current}
end
local owner = redis.call('HGET', KEYS[2], 'owner')
local lease = redis.call('HGET', KEYS[2], 'lease')
if owner and owner ~= ARGV[2] and lease and tonumber(lease) > tonumber(ARGV[3]) then
  return {0, owner, lease}
end
redis.call('HSET', KEYS[2], 'owner', ARGV[2], 'lease', ARGV[4])
if redis.call('HSETNX', KEYS[2], 'cursor', '0') == 1 then
  redis.call('HSET', KEYS[2], 'claimed', ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end
redis.call('HSET', KEYS[1], 'current', ARGV[1])
return {1, tonumber(redis.call('HGET', KEYS[2], 'cursor'))}
