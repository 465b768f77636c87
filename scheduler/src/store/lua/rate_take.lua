-- Per-channel rate limit, shared by every scheduler: takes up to N tokens from the
-- channel's token bucket (one key, so one slot on Redis Cluster).
-- KEYS[1] the channel's bucket (hash: tk tokens, ts last refill ms, bu blocked until ms,
-- pu rate halved until ms; see rate_penalize.lua)
-- ARGV[1] now ms ('' = Redis TIME, one clock for every scheduler), ARGV[2] rate per
-- second (0: the channel has no rate, only a penalty holds it), ARGV[3] burst,
-- ARGV[4] tokens wanted.
-- Returns {granted, ms until the next token (0 when all were granted), ms per token at
-- the rate in force (0 without a rate)}.
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local rate, burst, want = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local b = redis.call('HMGET', KEYS[1], 'tk', 'ts', 'bu', 'pu')
local blocked, halved = tonumber(b[3]) or 0, tonumber(b[4]) or 0
if rate <= 0 then
  if now < blocked then
    return {0, blocked - now, 0}
  end
  return {want, 0, 0}
end
if now < halved then
  rate = rate / 2
end
local per_token = 1000 / rate
if now < blocked then
  return {0, math.ceil(blocked - now + per_token), math.ceil(per_token)}
end
local tokens, since = tonumber(b[1]), tonumber(b[2])
if not tokens then
  tokens, since = burst, now
end
if now > since then
  tokens = tokens + (now - since) * rate / 1000
end
tokens = math.min(tokens, burst)
local granted = math.min(want, math.floor(tokens))
tokens = tokens - granted
local wait = 0
if granted < want then
  wait = math.ceil((1 - tokens) * per_token)
end
redis.call('HSET', KEYS[1], 'tk', tostring(tokens), 'ts', now)
-- Gone once it would be full again anyway (a missing bucket is a full one), but never
-- before a penalty it holds has run out.
local keep = math.max(math.ceil((burst - tokens) * per_token), halved - now, 0) + 1000
redis.call('PEXPIRE', KEYS[1], keep)
return {granted, wait, math.ceil(per_token)}
