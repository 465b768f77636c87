-- Applies a batch of outcomes for leased runs of one partition. An outcome counts
-- only while its run is still leased under the same fencing token; a stale one (the
-- lease expired and the step was handed out again, or the run was cancelled) is
-- ignored and counted, as is a second outcome for the same run in one batch (a worker
-- that re-attached may report a result twice).
-- KEYS[1] due set, KEYS[2] lease set, KEYS[3] dead-letter set
-- ARGV[1] run key prefix, ARGV[2] now ms, ARGV[3] retention of finished runs (s),
-- ARGV[4] prefix of the per-playbook dead-letter sets,
-- then per outcome 10 values: run id, fence, op ('next' | 'retry' | 'finish'),
--   step index, due ms, attempt, run status (for 'finish'), detail, timeline line ('' for none),
--   dead letter ('1': the run failed at an action step and waits in the dead-letter list).
-- 'next' and 'retry' schedule step `index` at `due` with `attempt`; 'finish' ends the run
-- and sets its expiry, except for a dead letter, which is kept (no expiry) until retried.
-- Returns {applied, stale}.
local runs, now, retention, dead_by_playbook = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local applied, stale = 0, 0
local released = {}
local seen = {}
for i = 5, #ARGV, 10 do
  local id = ARGV[i]
  local key = runs .. id
  local current = redis.call('HMGET', key, 'f', 't', 'pb')
  if not seen[id] and redis.call('ZSCORE', KEYS[2], id) and current[1] == ARGV[i + 1] then
    seen[id] = true
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
      if ARGV[i + 9] == '1' then
        redis.call('ZADD', KEYS[3], now, id)
        redis.call('ZADD', dead_by_playbook .. (current[3] or ''), now, id)
      else
        redis.call('EXPIRE', key, retention)
      end
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
