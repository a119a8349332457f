-- adjust_consumption: ARGV[8] request id, ARGV[9] actual tokens, ARGV[10] strategy. Takes the
-- extra or refunds the difference against the latest grant of that id. Returns {'ok'},
-- {'unknown'}, {'strict', wait in us} (nothing taken), {'warn', shortfall} or
-- {'compensate', shortfall, total debt}. A resent call (its reply lost) answers as the first run.
local kept = recalled(REPLY)
if kept ~= nil then
  return kept
end
local request_id, actual, strategy = ARGV[8], tonumber(ARGV[9]), ARGV[10]
prune()
local record = latest_record(request_id)
if record == nil then
  save()
  return {'unknown'}
end
refill(TOKENS)
local out = {'ok'}
if actual > record.tokens then
  local extra = actual - record.tokens
  if available(TOKENS) >= extra then
    take(TOKENS, extra)
    record.held = record.held + extra
  elseif strategy == 'strict' then
    save()
    return {'strict', exact(wait_for(TOKENS, extra))}
  else
    local shortfall = take(TOKENS, extra)
    record.held = record.held + extra - shortfall
    if strategy == 'compensate' then
      DEBT = DEBT + shortfall
      record.owed = record.owed + shortfall
      out = {'compensate', exact(shortfall), exact(DEBT)}
    else
      out = {'warn', exact(shortfall)}
    end
  end
elseif actual < record.tokens then
  -- A lower count gives back first what an earlier extra left unpaid: under 'warn' it was never
  -- taken; under 'compensate' it became debt (see give_back_owed). Then what the grant holds.
  local lower = record.tokens - actual
  local never = math.max(0, record.tokens + record.debt - record.held - record.owed)
  lower = lower - math.min(lower, never)
  local owed = math.min(lower, record.owed)
  record.owed = record.owed - owed
  give_back_owed(owed)
  lower = lower - owed
  refund(TOKENS, lower)
  record.held = record.held - lower
end
count_in(record, -1)
record.tokens = actual
-- 0 tokens is a refund (the call failed, or never reached the provider), not a measured count:
-- recording it would score a failed call as an estimation miss (as LLMThrottle does).
if actual > 0 then
  record.actual = actual
else
  record.actual = -1
end
count_in(record, 1)
store_record(record)
save()
return remember(REPLY, out)
