-- Stores a playbook as its next version unless the content is unchanged.
-- KEYS[1] playbook hash
-- ARGV[1] content digest, ARGV[2] stored version (JSON), ARGV[3] "1" for a dry run
-- Returns {status, version}: status 0 unchanged, 1 created, 2 dry run (would be version).
local latest = tonumber(redis.call('HGET', KEYS[1], 'latest') or '0')
if latest > 0 and redis.call('HGET', KEYS[1], 'digest') == ARGV[1] then
  return {0, latest}
end
if ARGV[3] == '1' then
  return {2, latest + 1}
end
local version = latest + 1
redis.call('HSET', KEYS[1], 'latest', version, 'digest', ARGV[1], 'v' .. version, ARGV[2])
return {1, version}
