-- enqueue / batch_enqueue: ARGV[5..] = request id, priority, serialised request, tenant,
-- estimated tokens, deadline in us (-1: none), input and output tokens (-1: not given), expected
-- processing time in seconds (-1: not given), repeated (the last six feed the ranking indexes).
-- All or nothing: a request id already live refuses the whole batch. Returns {NOW, 'ok',
-- message id, enqueued_at, ...} or {NOW, 'dup', request id}.
--
-- The i-th message id is derived from the call's random seed and i alone. So a retry of this very
-- call (the client resends it after a reply lost in transit) recognises its own first message and
-- answers as the first run did, instead of reporting its own requests as duplicates: the script is
-- atomic, so that run stored every request of the batch, all at one instant.
maintain()
local function message_id(i)
  return string.sub(redis.sha1hex(NONCE .. ':enqueue:' .. i), 1, 32)
end
local out = {NOW_TEXT, 'ok'}
local count = (#ARGV - 4) / 9
-- Bounded by the call's arguments: one round per request.
for i = 0, count - 1 do
  local rid = ARGV[5 + 9 * i]
  local member = redis.call('HGET', Q.ids, rid)
  local s = member and load(Q, member)
  if s and not (i == 0 and s.mid == message_id(0)) and catch_up(member, s) then
    member = nil -- expired or dead-lettered, though no call had got to it yet: the id is free
  end
  if member then
    if i == 0 and s and s.mid == message_id(0) then
      -- Bounded by the call's arguments: one round per request.
      for j = 0, count - 1 do
        out[#out + 1] = message_id(j)
        out[#out + 1] = s.at
      end
      return out
    end
    return {NOW_TEXT, 'dup', rid}
  end
end
-- Bounded by the call's arguments: one round per request.
for i = 0, count - 1 do
  local rid, p, body = ARGV[5 + 9 * i], tonumber(ARGV[6 + 9 * i]), ARGV[7 + 9 * i]
  local index = {
    ten = ARGV[8 + 9 * i], tok = tonumber(ARGV[9 + 9 * i]), dl = tonumber(ARGV[10 + 9 * i]),
    inp = tonumber(ARGV[11 + 9 * i]), out = tonumber(ARGV[12 + 9 * i]), ept = tonumber(ARGV[13 + 9 * i]),
  }
  insert(Q, rid, p, NOW, body, message_id(i), index)
  out[#out + 1] = message_id(i)
  out[#out + 1] = NOW
end
if count > 0 then
  touch(Q)
end
return out
