-- Applies a batch of outcomes for leased runs of one partition. An outcome counts
-- only while its run is still leased under the same fencing token; a stale one (the
-- lease expired and the step was handed out again, or the run was cancelled) is
-- ignored and counted.
-- KEYS[1] due set, KEYS[2] lease set
-- ARGV[1] run key prefix, ARGV[2] now ms, ARGV[3] retention of finished runs (s),
-- then per outcome 9 values: run id, fence, op ('next' | 'retry' | 'finish'),
--   step index, due ms, attempt, run status (for 'finish'), detail, timeline line ('' for none).
-- 'next' and 'retry' schedule step `index` at `due` with `attempt`; 'finish' ends the run.
-- Returns {applied, stale}.
local runs, now, retention = ARGV[1], ARGV[2], ARGV[3]
local applied, stale = 0, 0
local released = {}
for i = 4, #ARGV, 9 do
  local id = ARGV[i]
  local key = runs .. id
  local current = redis.call('HMGET', key, 'f', 't')
  if redis.call('ZSCORE', KEYS[2], id) and current[1] == ARGV[i + 1] then
    released[#released + 1] = id
    local fields = {'ua', now, 'd', ARGV[i + 7], 'i', ARGV[i + 3]}
    local line = ARGV[i + 8]
    if line ~= '' then
      if current[2] then
        line = current[2] .. '\n' .. line
      end
      fields[#fields + 1] = 't'
      fields[#fields + 1] = line
    end
    if ARGV[i + 2] == 'finish' then
      fields[#fields + 1] = 'st'
      fields[#fields + 1] = ARGV[i + 6]
      redis.call('HSET', key, unpack(fields))
      redis.call('EXPIRE', key, retention)
    else
      fields[#fields + 1] = 'a'
      fields[#fields + 1] = ARGV[i + 5]
      fields[#fields + 1] = 'due'
      fields[#fields + 1] = ARGV[i + 4]
      redis.call('HSET', key, unpack(fields))
      redis.call('ZADD', KEYS[1], ARGV[i + 4], id)
    end
    applied = applied + 1
  else
    stale = stale + 1
  end
end
if #released > 0 then
  redis.call('ZREM', KEYS[2], unpack(released))
end
return {applied, stale}
