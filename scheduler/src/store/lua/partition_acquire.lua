-- Takes or renews a partition's ownership lease for a scheduler: set when the lease is
-- free or already this scheduler's, left alone when another scheduler holds it.
-- KEYS[1] the partition's owner key
-- ARGV[1] scheduler id, ARGV[2] lease (ms)
-- Returns the owner after the call (ARGV[1] when taken or renewed).
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then
  return owner
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ARGV[1]
