-- sync_from_headers: ARGV[8] Retry-After in us, ARGV[9] requests remaining, ARGV[10] requests reset
-- in us, ARGV[11] tokens remaining, ARGV[12] tokens reset in us ('' where the provider said
-- nothing). A remaining figure cuts its bucket to at most that now; with a reset, the bucket may
-- hold no more than that figure minus what it grants until the reset (a ceiling); without one,
-- any earlier ceiling goes (the provider's newest word counts).
refill(REQUESTS)
refill(TOKENS)
if ARGV[8] ~= '' then
  PENALTY = math.max(PENALTY, NOW + tonumber(ARGV[8]))
end
for _, spec in ipairs({{REQUESTS, ARGV[9], ARGV[10]}, {TOKENS, ARGV[11], ARGV[12]}}) do
  local remaining = tonumber(spec[2])
  if remaining ~= nil then
    cap_at(spec[1], remaining, tonumber(spec[3]))
  end
end
save()
return 1
