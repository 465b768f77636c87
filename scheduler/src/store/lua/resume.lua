-- Resumes a playbook's parked runs of one partition: each goes back to due at the time
-- its step came due (so it goes out at once, late but not lost).
-- KEYS[1] due set, KEYS[2] the playbook's paused-runs set
-- Returns how many runs went back.
local parked = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
for n = 1, #parked, 2 do
  redis.call('ZADD', KEYS[1], parked[n + 1], parked[n])
end
redis.call('DEL', KEYS[2])
return #parked / 2
