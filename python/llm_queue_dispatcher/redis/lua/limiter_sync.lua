-- sync_from_headers: ARGV[8] Retry-After in us, ARGV[9] requests remaining, ARGV[10] requests reset
-- in us, ARGV[11] tokens remaining, ARGV[12] tokens reset in us ('' where the provider said
-- nothing). A remaining figure cuts its bucket to at most that now; with a reset, the bucket may
-- not hand out more than that figure minus what it grants until the reset (a ceiling).
refill(REQUESTS)
refill(TOKENS)
if ARGV[8] ~= '' then
  PENALTY = math.max(PENALTY, NOW + tonumber(ARGV[8]))
end
for _, spec in ipairs({{REQUESTS, ARGV[9], ARGV[10]}, {TOKENS, ARGV[11], ARGV[12]}}) do
  local b, remaining, reset = spec[1], tonumber(spec[2]), tonumber(spec[3])
  if remaining ~= nil then
    b.avail = math.min(b.avail, remaining)
    if reset ~= nil and reset > 0 then
      b.ceiling = remaining
      b.ceiling_until = NOW + reset
    end
  end
end
save()
return 1
