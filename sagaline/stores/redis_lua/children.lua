-- Retention (redis_gc.py): the child sagas one bucket indexes under each of several
-- parents, with each child's status, in one call rather than a ZRANGE per parent.
-- KEYS: `idx:parent:<id>` of one bucket (one hash slot; KEYS[1] routes the call), one
-- per parent. ARGV[1]: the start of the names of that bucket's saga hashes (a child is
-- indexed in its own bucket). Returns, flat, [i, child id, status (as stored)] of
-- each child of KEYS[i] whose saga still exists.
local out = {}
for i, key in ipairs(KEYS) do
  for _, child in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    local status = redis.call('HGET', ARGV[1] .. child, 'status')
    if status then
      out[#out + 1] = i
      out[#out + 1] = child
      out[#out + 1] = status
    end
  end
end
return out
