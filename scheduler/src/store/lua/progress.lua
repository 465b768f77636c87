-- A worker's progress on a step it holds (TaskProgress): recorded only while the run is
-- still leased with a deadline ahead of now and under the worker's fencing token (as
-- for heartbeats); otherwise ignored.
-- KEYS[1] lease set
-- ARGV[1] run key prefix, ARGV[2] now ms, ARGV[3] run id, ARGV[4] fencing token,
-- ARGV[5] detail (the run's `d`; '' leaves it), ARGV[6] resume state (the run's `rs`, kept until the
-- run moves on from the step; '' leaves the saved one as it is).
-- Returns 1 when recorded, 0 when ignored.
local id = ARGV[3]
local key = ARGV[1] .. id
local deadline = tonumber(redis.call('ZSCORE', KEYS[1], id) or '')
if not deadline or deadline <= tonumber(ARGV[2]) or redis.call('HGET', key, 'f') ~= ARGV[4] then
  return 0
end
local fields = {}
if ARGV[5] ~= '' then
  fields[#fields + 1] = 'd'
  fields[#fields + 1] = ARGV[5]
end
if ARGV[6] ~= '' then
  fields[#fields + 1] = 'rs'
  fields[#fields + 1] = ARGV[6]
end
if #fields > 0 then
  redis.call('HSET', key, unpack(fields))
end
return 1
