-- sync_from_headers: ARGV[8] Retry-After in us, ARGV[9] requests remaining, ARGV[10] requests reset
-- in us, ARGV[11] tokens remaining, ARGV[12] tokens reset in us ('' where the provider said
-- nothing; durations count at most MAX_DELAY_US, one day). A remaining figure cuts its bucket to
-- at most that now; with a reset, the bucket may hold no more than that figure minus what it
-- grants until the reset (a ceiling); without one, any earlier ceiling goes (the provider's
-- newest word counts). Returns the server's instant (us), which the client uses to read the
-- provider's absolute instants on the server's clock.
refill(REQUESTS)
refill(TOKENS)
local retry_after = delay_us(ARGV[8])
if retry_after ~= nil then
  PENALTY = math.max(PENALTY, NOW + retry_after)
end
for _, spec in ipairs({{REQUESTS, ARGV[9], ARGV[10]}, {TOKENS, ARGV[11], ARGV[12]}}) do -- the two buckets
  local remaining = tonumber(spec[2])
  if remaining ~= nil and remaining == remaining then
    cap_at(spec[1], remaining, delay_us(spec[3]))
  end
end
save()
return fmt(NOW)
