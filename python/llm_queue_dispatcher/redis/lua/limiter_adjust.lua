-- adjust_consumption: ARGV[15] request id, ARGV[16] actual tokens, ARGV[17] strategy, ARGV[18]
-- actual input tokens, ARGV[19] actual output tokens ('' when not given). Moves each token bucket's
-- charge of the latest grant of that id to its share of the actual count: takes the extra or
-- refunds the difference; frees the grant's slot of max_concurrent (an adjustment settles it).
-- Without the parts, an input bucket counts the whole actual count and an output bucket the whole
-- up to the output the grant reserved. Returns {'unknown'}; {'strict', wait in us, reason}
-- (nothing taken: some bucket holds less than its extra, the reason names the one with the
-- longest wait); or {'ok', then name, 'warn' or 'compensate', shortfall, debt now, for each
-- bucket that could not take its whole extra}. A resent call (its reply lost) answers as the
-- first run.
local kept = recalled(REPLY)
if kept ~= nil then
  return kept
end
local request_id, actual, strategy = ARGV[15], tonumber(ARGV[16]), ARGV[17]
local input, output = tonumber(ARGV[18]), tonumber(ARGV[19])
prune()
local record = latest_record(request_id)
if record == nil then
  save()
  return {'unknown'}
end

for n_ = 1, #METERS do -- the token buckets configured
  local b = METERS[n_]
  refill(b)
end
if strategy == 'strict' then
  local longest, reason = 0, ''
  for n_ = 1, #METERS do -- the token buckets configured
    local b = METERS[n_]
    local ch = charge_of(record, b)
    if ch ~= nil then
      local extra = adjust_target(b, record, actual, input, output) - ch.c
      if extra > 0 and available(b) < extra then
        local wait = wait_for(b, extra)
        if reason == '' or wait > longest then
          longest, reason = wait, b.name .. '_limit'
        end
      end
    end
  end
  if reason ~= '' then
    save()
    return {'strict', exact(longest), reason}
  end
end
count_in(record, -1)
local out = {'ok'}
for n_ = 1, #METERS do -- the token buckets configured
  local b = METERS[n_]
  local ch = charge_of(record, b)
  if ch ~= nil then
    local result = adjust_charge(b, ch, adjust_target(b, record, actual, input, output), strategy)
    set_charge(record, b, ch)
    if result ~= nil then
      out[#out + 1] = b.name
      out[#out + 1] = result[1]
      out[#out + 1] = exact(result[2])
      out[#out + 1] = exact(result[3])
    end
  end
end
record.tokens = actual
-- 0 tokens is a refund (the call failed, or never reached the provider), not a measured count:
-- recording it would score a failed call as an estimation miss (as LLMThrottle does).
if actual > 0 then
  record.actual = actual
else
  record.actual = -1
end
record.input = input or -1
record.output = output or -1
free_slot(record)
count_in(record, 1)
store_record(record)
save()
return remember(REPLY, out)
