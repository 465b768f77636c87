-- Extends leases of one partition for a worker's heartbeat. A lease is extended only
-- while its run is still in the lease set with a deadline ahead of now (an expired lease
-- goes back to due at the next claim and stays lost) and under the fencing token the
-- worker was handed (a later claim or a cancel bumped it: superseded). A deadline is
-- never moved earlier.
-- KEYS[1] lease set
-- ARGV[1] run key prefix, ARGV[2] now ms, ARGV[3] new deadline ms,
-- then per task 2 values: run id, fencing token.
-- Returns the ids of the runs whose leases were extended.
local runs, now, deadline = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local extended = {}
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  local current = tonumber(redis.call('ZSCORE', KEYS[1], id) or '')
  if current and current > now and redis.call('HGET', runs .. id, 'f') == ARGV[i + 1] then
    if current < deadline then
      redis.call('ZADD', KEYS[1], 'XX', deadline, id)
    end
    extended[#extended + 1] = id
  end
end
return extended
