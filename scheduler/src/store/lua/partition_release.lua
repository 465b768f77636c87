-- Gives up a partition's ownership lease, only if the scheduler still holds it.
-- KEYS[1] the partition's owner key
-- ARGV[1] scheduler id
-- Returns 1 when released, 0 when the lease was not this scheduler's.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
