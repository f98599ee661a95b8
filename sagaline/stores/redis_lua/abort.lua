-- Make sure saga KEYS[1] is never created, unless it exists: sets KEYS[2] (its
-- `aborted` key, which create.lua checks) and returns 1, or returns 0 if it exists.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[2], '1')
return 1
