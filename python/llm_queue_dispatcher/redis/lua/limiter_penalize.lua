-- penalize: ARGV[15] seconds in us (at most MAX_DELAY_US: one day). Nothing is granted until now +
-- that (or a later penalty already set). Returns the penalty left in us.
local seconds = delay_us(ARGV[15])
if seconds ~= nil then
  PENALTY = math.max(PENALTY, NOW + seconds)
end
for _, b in ipairs(BUCKETS) do -- the buckets configured
  refill(b)
end
save()
return fmt(math.max(0, PENALTY - NOW))
