-- get_metrics: {requests available, tokens available, debt, penalty left in us, records, tokens
-- in the records, adjusted records, sum of their estimation accuracy}. Only drops expired records.
if prune() > 0 then
  save()
end
return {
  exact(available(REQUESTS)), exact(available(TOKENS)), exact(DEBT), fmt(math.max(0, PENALTY - NOW)),
  redis.call('ZCARD', ORDER), fmt(TOTALS.tokens), fmt(TOTALS.adjusted), exact(TOTALS.accuracy),
}
