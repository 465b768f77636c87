-- A provider answered "too many requests" on a channel: every scheduler holds the
-- channel back until `blocked until`, then hands it out at half its rate for a while.
-- KEYS[1] the channel's bucket (see rate_take.lua)
-- ARGV[1] now ms ('' = Redis TIME), ARGV[2] how long to block (ms), ARGV[3] how long
-- the rate stays halved after that (ms).
-- The bucket is emptied: after the block, tokens come at the halved rate from 0.
-- A later block never shortens an earlier one.
-- Returns the ms until the channel is free again.
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local blocked = math.max(tonumber(redis.call('HGET', KEYS[1], 'bu') or '0') or 0, now + tonumber(ARGV[2]))
local halved = blocked + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'tk', 0, 'ts', blocked, 'bu', blocked, 'pu', halved)
redis.call('PEXPIRE', KEYS[1], halved - now + 60000)
return blocked - now
