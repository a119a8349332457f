-- consume: ARGV[8] request id, ARGV[9] estimated tokens. One request and the estimate plus the
-- debt, all or nothing. Returns {1, grant number} when granted, else {0, reason, wait in us,
-- requests available, tokens available} and nothing changes. A grant is a new record, even when the id already has
-- one (LLMThrottle keeps both; adjust_consumption and release then act on the newer). A resent
-- call (its reply lost) is granted once: the first run's reply is kept (common.lua).
local kept = recalled(REPLY)
if kept ~= nil then
  return kept
end
local request_id, estimated = ARGV[8], tonumber(ARGV[9])
local reason, wait = check(estimated)
if reason ~= '' then
  return {0, reason, exact(wait), exact(available(REQUESTS)), exact(available(TOKENS))}
end
refill(REQUESTS)
refill(TOKENS)
local needed = tokens_needed(estimated)
take(REQUESTS, 1)
take(TOKENS, needed)
local applied = math.max(0, needed - estimated)
DEBT = DEBT - applied
if DEBT < DEBT_DUST then
  DEBT = 0
end
local grant = {at = NOW, tokens = estimated, estimated = estimated, actual = -1, debt = applied, held = needed, owed = 0}
add_record(request_id, grant)
prune()
save()
-- The grant's number is kept with the reply: a client that never got the reply gives this very
-- grant back (limiter_settle.lua).
return remember(REPLY, {1, grant.number})
