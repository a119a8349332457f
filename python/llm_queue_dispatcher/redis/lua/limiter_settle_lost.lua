-- settle_lost: KEYS[6..] the reply keys of consume calls whose reply never reached their client (a
-- timeout while Redis was paused or slow, a connection broken after the call was sent). Such a
-- call may have run, may never run, or may still run (sent, and read once the server resumes);
-- its client reported "nothing granted". For each key:
--   * the call ran and granted: that very grant (its number is in the kept reply) is given back
--     whole, and the key then says so, so a second settle gives nothing back twice;
--   * no reply kept: the call has not run. A reply is kept under its key now (a refusal), so if
--     the call still arrives it answers from it and grants nothing (common.lua's recalled()).
-- Either way the books hold as if the call had never been made. Keys are kept REPLY_MEMORY_MS,
-- as every reply. Returns how many grants were given back.
local given_back = 0
local SETTLED = {0, 'settled', '0', '0', '0'}
-- Bounded by the keys of the call (RedisThrottle sends at most 64).
for i = 6, #KEYS do
  local key = KEYS[i]
  local kept = recalled(key)
  if kept == nil then
    remember(key, SETTLED)
  elseif kept[1] == 1 and kept[2] ~= nil then
    local record = load_record(kept[2])
    if record ~= nil and record.released == 0 then
      given_back = given_back + 1
      give_back(record, redis.call('HGET', LATEST, record.rid) == record.number)
    end
    remember(key, SETTLED)
  end
end
if given_back > 0 then
  save()
end
return given_back
