-- Retention (redis_gc.py): delete sagas of one bucket, each only if it still exists
-- (another gc may have deleted it) and still has the `txn` counter it was read with
-- (no transact wrote it since: same status, same steps). KEYS: the sagas' hashes, all
-- in one bucket (one hash slot; KEYS[1] routes the call). ARGV[1]: JSON, per saga in
-- KEYS order: its txn, steps and events keys, index entries and keys to unlink.
-- Returns JSON: per saga, [deleted (1/0), steps deleted, events deleted].
local p = cjson.decode(ARGV[1])
local out = {}
for i, s in ipairs(p) do
  local key = KEYS[i]
  if redis.call('EXISTS', key) == 1 and (redis.call('HGET', key, 'txn') or '0') == s.txn then
    local steps = redis.call('ZCARD', s.steps_key)
    local events = redis.call('LLEN', s.events_key)
    for _, z in ipairs(s.zrem) do redis.call('ZREM', z[1], z[2]) end
    -- UNLINK frees a long history in the background rather than inside the script.
    for _, k in ipairs(s.unlink) do redis.call('UNLINK', k) end
    out[#out + 1] = {1, steps, events}
  else
    out[#out + 1] = {0, 0, 0}
  end
end
return cjson.encode(out)
