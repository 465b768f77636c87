-- Which of the listed runs no longer hold the lease their step was handed out under:
-- the run finished, was cancelled or reached its goal, or its attempt ended, so its
-- fencing token moved on. Reads only.
-- KEYS[1] lease set (the partition's slot)
-- ARGV[1] run key prefix, then pairs of run id and fencing token
-- Returns the ids of those runs.
local moved = {}
for n = 2, #ARGV, 2 do
  local run = redis.call('HMGET', ARGV[1] .. ARGV[n], 'st', 'f')
  if run[1] ~= 'active' or (run[2] or '1') ~= ARGV[n + 1] then
    moved[#moved + 1] = ARGV[n]
  end
end
return moved
