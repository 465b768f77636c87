-- Retries dead-lettered runs of one partition. Each run that is `failed` and in the
-- dead-letter list leaves the list (and its playbook's), and becomes active again at
-- the step it failed at: attempt 1, due now, no expiry, no detail. The failed step's
-- timeline line is dropped, so the step reads as scheduled again and, once it is
-- delivered, as done. The step index is unchanged, so every delivery of the step
-- carries the same idempotency key as before it failed.
-- KEYS[1] due set, KEYS[2] dead-letter set
-- ARGV[1] run key prefix, ARGV[2] prefix of the per-playbook dead-letter sets,
-- ARGV[3] now ms, ARGV[4] playbook the caller retries ('' for none), ARGV[5] stats prefix,
-- then run ids.
-- Returns one code per run id: 1 retried; 0 not dead-lettered (the run is left as it is;
-- a stale list entry naming it is dropped); -1 no such run (its entries in the set and
-- in ARGV[4]'s set are dropped).
local runs, dead_by_playbook, now, playbook = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local codes = {}
for n = 6, #ARGV do
  local id = ARGV[n]
  local key = runs .. id
  local run = redis.call('HMGET', key, 'st', 'pb', 'i', 't', 'v')
  if not run[1] then
    redis.call('ZREM', KEYS[2], id)
    if playbook ~= '' then
      redis.call('ZREM', dead_by_playbook .. playbook, id)
    end
    codes[#codes + 1] = -1
  elseif run[1] ~= 'failed' or not redis.call('ZSCORE', KEYS[2], id) then
    -- The partition's set is the truth: an entry elsewhere is stale.
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZREM', dead_by_playbook .. (run[2] or ''), id)
    if playbook ~= '' then
      redis.call('ZREM', dead_by_playbook .. playbook, id)
    end
    codes[#codes + 1] = 0
  else
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZREM', dead_by_playbook .. (run[2] or ''), id)
    local timeline = run[4]
    if timeline then
      local cut = string.find(timeline, '\n[^\n]*$')
      local last = timeline
      if cut then
        last = string.sub(timeline, cut + 1)
      end
      local failed = '{"i":' .. (run[3] or '') .. ',"s":"failed"'
      if string.sub(last, 1, #failed) == failed then
        if cut then
          timeline = string.sub(timeline, 1, cut - 1)
        else
          timeline = nil
        end
      end
    end
    redis.call('HSET', key, 'st', 'active', 'a', 1, 'due', now, 'ua', now)
    if timeline then
      redis.call('HSET', key, 't', timeline)
    else
      redis.call('HDEL', key, 't')
    end
    redis.call('HDEL', key, 'd')
    redis.call('PERSIST', key)
    redis.call('ZADD', KEYS[1], now, id)
    -- Back in the funnel: waiting at the step again, no longer failed.
    local stats = ARGV[5] .. (run[2] or '') .. ':' .. (run[5] or '')
    redis.call('HINCRBY', stats, (run[3] or '') .. ':failed', -1)
    redis.call('HINCRBY', stats, 'runs:failed', -1)
    codes[#codes + 1] = 1
  end
end
return codes
