-- sync_from_headers: ARGV[15] Retry-After in us; then remaining and reset in us of requests
-- (ARGV[16], ARGV[17]), tokens (ARGV[18], ARGV[19]), input tokens (ARGV[20], ARGV[21]) and output
-- tokens (ARGV[22], ARGV[23]), for the rpm, tpm, itpm and otpm buckets ('' where the provider said
-- nothing; a figure for a bucket not configured is ignored; durations count at most MAX_DELAY_US,
-- one day). A remaining figure cuts its bucket to at most that now, and from there the bucket
-- refills at its own rate up to its own capacity: the reset holds nothing down (a provider's
-- reset is when its own bucket is full again; it refills continuously until then). Returns the server's instant (us), which the client uses to
-- read the provider's absolute instants on the server's clock.
for _, b in ipairs(BUCKETS) do -- the buckets configured
  refill(b)
end
local retry_after = delay_us(ARGV[15])
if retry_after ~= nil then
  PENALTY = math.max(PENALTY, NOW + retry_after)
end
local figures = {
  {'rpm', ARGV[16], ARGV[17]}, {'tpm', ARGV[18], ARGV[19]}, {'itpm', ARGV[20], ARGV[21]}, {'otpm', ARGV[22], ARGV[23]},
}
for _, spec in ipairs(figures) do -- the four figures a provider may send
  local b = BY_NAME[spec[1]]
  local remaining = tonumber(spec[2])
  if b ~= nil and remaining ~= nil and remaining == remaining then
    cap_at(b, remaining)
  end
end
save()
return fmt(NOW)
