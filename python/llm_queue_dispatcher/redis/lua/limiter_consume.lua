-- consume: ARGV[15] request id, ARGV[16] estimated tokens, ARGV[17] input tokens, ARGV[18] output
-- tokens ('' when not given). One request from each request bucket, from each token bucket its
-- share of the estimate plus its debt, and a slot of max_concurrent, all or nothing. Returns
-- {1, grant number} when granted, else {0, then the reply of a check (limiter_check.lua)} and nothing changes. A
-- grant is a new record, even when the id already has one (LLMThrottle keeps both;
-- adjust_consumption and release then act on the newer). A resent call (its reply lost) is
-- granted once: the first run's reply is kept (common.lua).
local kept = recalled(REPLY)
if kept ~= nil then
  return kept
end
local request_id, estimated = ARGV[15], tonumber(ARGV[16])
local input, output = tonumber(ARGV[17]), tonumber(ARGV[18])
local reason, wait = '', 0
if PRECHECKED then
  PRECHECKED = false -- checked with the reserves (global_choice.py, 'reserve'): it holds alone
else
  reason, wait = check(estimated, input, output)
end
if reason ~= '' then
  local refused = {0}
  for _, item in ipairs(check_reply(reason, wait)) do -- the check's reply
    refused[#refused + 1] = item
  end
  return refused
end
local record = {
  at = NOW, estimated = estimated, actual = -1, input = input or -1, output = output or -1,
  output_cap = output or -1, slot = 0, charges = {},
}
if MAX_CONCURRENT ~= nil then
  record.slot = 1
end
for n_ = 1, #BUCKETS do -- the buckets configured
  local b = BUCKETS[n_]
  refill(b)
  if b.counts == 'request' then
    take(b, 1)
  else
    local tokens = share(b, estimated, input, output)
    local n = needed(b, tokens)
    take(b, n)
    local applied = math.max(0, n - tokens)
    b.debt = b.debt - applied
    if b.debt < DEBT_DUST then
      b.debt = 0
    end
    set_charge(record, b, {c = tokens, d = applied, h = n, w = 0})
  end
end
add_record(request_id, record)
prune()
save()
-- The grant's number is kept with the reply: a client that never got the reply gives this very
-- grant back (limiter_settle_lost.lua).
return remember(REPLY, {1, record.number})
