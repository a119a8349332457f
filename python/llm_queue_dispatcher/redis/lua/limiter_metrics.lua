-- get_metrics: {requests available, tokens available, debt, penalty left in us, records that
-- count, their tokens, adjusted records, sum of their estimation accuracy}. Only drops expired records.
if prune() > 0 then
  save()
end
return {
  exact(available(REQUESTS)), exact(available(TOKENS)), exact(DEBT), fmt(math.max(0, PENALTY - NOW)),
  fmt(TOTALS.live), fmt(TOTALS.tokens), fmt(TOTALS.adjusted), exact(TOTALS.accuracy),
}
