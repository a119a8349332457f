-- peek_messages_by_priority: ARGV[5] priority, ARGV[6] limit. Visible messages of that priority,
-- oldest first, unchanged. Returns NOW, then per message: message id, receive count, enqueued_at,
-- first_received_at, serialised request.
maintain()
local out = {fmt(NOW)}
local limit = tonumber(ARGV[6])
if limit <= 0 then
  return out
end
-- Bounded by `limit`.
for _, member in ipairs(live_range(tonumber(ARGV[5]) + 1, limit)) do
  local s = load(Q, member)
  out[#out + 1] = s.mid
  out[#out + 1] = s.rc
  out[#out + 1] = s.at
  out[#out + 1] = s.first
  out[#out + 1] = redis.call('HGET', Q.body, member)
end
return out
