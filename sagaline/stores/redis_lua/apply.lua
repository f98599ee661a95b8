-- The writes shared by create.lua and write.lua, spliced into each where it says
-- `--@apply`. `p` is the script's decoded JSON payload. Scores and positions
-- arrive as strings so that Lua never turns a float into a number (it would round
-- timestamps).
for _, h in ipairs(p.hset) do redis.call('HSET', h[1], unpack(h[2])) end
for _, z in ipairs(p.zrem) do redis.call('ZREM', z[1], z[2]) end
for _, z in ipairs(p.zadd) do redis.call('ZADD', z[1], z[2], z[3]) end
for _, e in ipairs(p.events) do redis.call('RPUSH', p.events_key, e) end
