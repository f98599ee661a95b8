-- The saga and its steps in one round trip (snapshot.lua).
-- KEYS: saga hash, step-name index. ARGV: the step-hash key prefix of this saga,
-- then a JSON object of step name -> version of each step record the caller holds.
--@snapshot
return snapshot(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
