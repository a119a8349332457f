-- consume: ARGV[8] request id, ARGV[9] estimated tokens. One request and the estimate plus the
-- debt, all or nothing. Returns {1} when granted, else {0, reason, wait in us, requests available,
-- tokens available} and nothing changes.
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
local previous = load_record(request_id)
if previous ~= nil then
  forget_record(request_id, previous)
end
local record = {at = NOW, tokens = estimated, estimated = estimated, actual = -1, debt = applied, held = needed, owed = 0}
store_record(request_id, record)
redis.call('ZADD', ORDER, fmt(NOW), request_id)
count_in(record, 1)
prune()
save()
return {1}
