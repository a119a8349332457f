-- penalize: ARGV[8] seconds in us. Nothing is granted until now + that (or a later penalty
-- already set). Returns the penalty left in us.
PENALTY = math.max(PENALTY, NOW + tonumber(ARGV[8]))
refill(REQUESTS)
refill(TOKENS)
save()
return fmt(PENALTY - NOW)
