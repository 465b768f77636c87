-- Creates or updates a contact and its tag index.
-- KEYS[1] contact hash
-- ARGV[1] tag set prefix, ARGV[2] contact id, ARGV[3] number of fields to set (pairs),
-- ARGV[4] number of fields to remove, ARGV[5] number of tags to add,
-- then the field/value pairs, the fields to remove, the tags to add, the tags to remove.
-- Returns the contact's fields after the change.
local sets, removes, adds = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local n = 6
if sets > 0 then
  redis.call('HSET', KEYS[1], unpack(ARGV, n, n + 2 * sets - 1))
end
n = n + 2 * sets
if removes > 0 then
  redis.call('HDEL', KEYS[1], unpack(ARGV, n, n + removes - 1))
end
n = n + removes
for k = n, n + adds - 1 do
  redis.call('SADD', ARGV[1] .. ARGV[k], ARGV[2])
end
for k = n + adds, #ARGV do
  redis.call('SREM', ARGV[1] .. ARGV[k], ARGV[2])
end
return redis.call('HGETALL', KEYS[1])
