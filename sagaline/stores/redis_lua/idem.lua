-- An idempotency key (KEYS[1]). ARGV: 'reserve', id: set it to id unless it is set;
-- 'take', old, new: set it to new if it still names old (a saga aborted before it was
-- created). Returns the id the key names afterwards.
if ARGV[1] == 'reserve' then
  redis.call('SET', KEYS[1], ARGV[2], 'NX')
elseif redis.call('GET', KEYS[1]) == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[3])
end
return redis.call('GET', KEYS[1])
