-- Drops the entries of runs that no longer exist (expired after their retention, or
-- deleted) from one playbook's run list of one partition, a page at a time, up to the
-- entries of runs enrolled at a given time (a run younger than its retention cannot
-- have expired).
-- KEYS[1] the run list (a stream)
-- ARGV[1] run key prefix, ARGV[2] entry id to continue after ('' from the start),
-- ARGV[3] most entries to look at, ARGV[4] the last entry id to look at ('+': all).
-- Returns {entries dropped, the last entry id looked at ('' when the list ended)}.
local start = ARGV[2] == '' and '-' or '(' .. ARGV[2]
local entries = redis.call('XRANGE', KEYS[1], start, ARGV[4], 'COUNT', tonumber(ARGV[3]))
local gone = {}
for _, entry in ipairs(entries) do
  local fields = entry[2]
  if fields[2] and redis.call('EXISTS', ARGV[1] .. fields[2]) == 0 then
    gone[#gone + 1] = entry[1]
  end
end
if #gone > 0 then
  redis.call('XDEL', KEYS[1], unpack(gone))
end
local last = ''
if #entries == tonumber(ARGV[3]) then
  last = entries[#entries][1]
end
return {#gone, last}
