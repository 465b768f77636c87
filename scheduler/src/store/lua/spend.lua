-- The contact budget: checks and counts sends against frequency caps in one step, so
-- two schedulers cannot both spend a contact's last unit.
-- KEYS[1] any key of the partition (routes the call to its slot)
-- ARGV[1] prefix of the per-contact send sets, ARGV[2] now ms,
-- then per send: member (run id.step id), contact id, number of caps, then per cap:
-- cap channel ('*' or a channel), window start ms, max, how long a send is kept (ms).
-- A send already counted (a retry of the same step) passes without counting again.
-- Returns one entry per send: {0} allowed and counted, or {k, oldest} refused by its
-- k-th cap, with the time of the oldest send counted in that cap's window.
local prefix, now = ARGV[1], tonumber(ARGV[2])
local out = {}
local i = 3
while i <= #ARGV do
  local member, contact, caps = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local first = i + 3
  i = first + 4 * caps
  local base = prefix .. contact .. '|'
  local refused, oldest = 0, ''
  if caps > 0 and not redis.call('ZSCORE', base .. ARGV[first], member) then
    for k = 1, caps do
      local at = first + 4 * (k - 1)
      local key = base .. ARGV[at]
      if redis.call('ZCOUNT', key, ARGV[at + 1], '+inf') >= tonumber(ARGV[at + 2]) then
        refused = k
        local first_in = redis.call('ZRANGEBYSCORE', key, ARGV[at + 1], '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
        oldest = first_in[2] or ''
        break
      end
    end
    if refused == 0 then
      for k = 1, caps do
        local at = first + 4 * (k - 1)
        local key = base .. ARGV[at]
        local keep = tonumber(ARGV[at + 3])
        redis.call('ZADD', key, now, member)
        redis.call('ZREMRANGEBYSCORE', key, '-inf', now - keep)
        redis.call('PEXPIRE', key, keep)
      end
    end
  end
  out[#out + 1] = {refused, oldest}
end
return out
