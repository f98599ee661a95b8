-- Retention (redis_gc.py): delete saga trees, each only if every saga in it still
-- has the `txn` counter it was read with (no transact wrote it since: same status,
-- same steps). Returns JSON: per tree, [deleted (1/0), steps deleted, events deleted].
local p = cjson.decode(ARGV[1])
local out = {}
for _, tree in ipairs(p.trees) do
  local same = true
  for _, s in ipairs(tree) do
    -- EXISTS: a saga another gc deleted meanwhile is not deleted (nor counted) twice.
    if redis.call('EXISTS', s.key) == 0
      or (redis.call('HGET', s.key, 'txn') or '0') ~= s.txn then same = false; break end
  end
  local steps, events = 0, 0
  if same then
    for _, s in ipairs(tree) do
      steps = steps + redis.call('ZCARD', s.steps_key)
      events = events + redis.call('LLEN', s.events_key)
      if s.idem and redis.call('GET', s.idem) == s.id then redis.call('DEL', s.idem) end
      for _, z in ipairs(s.zrem) do redis.call('ZREM', z[1], z[2]) end
      -- UNLINK frees a long history in the background rather than inside the script.
      for _, k in ipairs(s.unlink) do redis.call('UNLINK', k) end
    end
  end
  out[#out + 1] = {same and 1 or 0, steps, events}
end
return cjson.encode(out)
