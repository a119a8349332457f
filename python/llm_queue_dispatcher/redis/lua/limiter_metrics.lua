-- get_metrics: {requests available, tokens available, tpm debt, penalty left in us, records that
-- count, their tokens, adjusted records, sum of their estimation accuracy, then name, level, debt
-- of each other bucket configured, then 'concurrency', requests in flight, 0 when limited}. Only
-- drops expired records.
if prune() > 0 then
  save()
end
local out = {
  exact(available(REQUESTS)), exact(available(TOKENS)), exact(TOKENS.debt), fmt(math.max(0, PENALTY - NOW)),
  fmt(TOTALS.live), fmt(TOTALS.tokens), fmt(TOTALS.adjusted), exact(TOTALS.accuracy),
}
for i = 3, #BUCKETS do -- the buckets configured beyond rpm and tpm
  out[#out + 1] = BUCKETS[i].name
  out[#out + 1] = exact(available(BUCKETS[i]))
  out[#out + 1] = exact(BUCKETS[i].debt or 0)
end
if MAX_CONCURRENT ~= nil then
  out[#out + 1] = 'concurrency'
  out[#out + 1] = fmt(in_flight())
  out[#out + 1] = '0'
end
return out
