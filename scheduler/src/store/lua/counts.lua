-- Funnel counters, added up while a script runs and written once per key and field at
-- its end by write_counts(): a batch of runs costs one HINCRBY per counter, not per run.
-- (Prepended to the scripts that count; see `with_preludes` in store/mod.rs.)
local counts = {}
local function count(key, field)
  local fields = counts[key]
  if not fields then
    fields = {}
    counts[key] = fields
  end
  fields[field] = (fields[field] or 0) + 1
end
local function write_counts()
  for key, fields in pairs(counts) do
    for field, n in pairs(fields) do
      redis.call('HINCRBY', key, field, n)
    end
  end
end
