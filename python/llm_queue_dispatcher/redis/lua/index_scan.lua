-- index_scan: part of indexing a queue whose messages were stored by a version without the
-- ranking index (global_choice.py). ARGV[5] an HSCAN cursor over the messages' states. Returns
-- {next cursor ('0': the scan is done), then per message not in the index: member, serialised
-- request}; the client reads tenant, estimate and deadline from each and sends them to
-- index_fill.lua.
local found = redis.call('HSCAN', Q.state, ARGV[5], 'COUNT', 256)
local out = {found[1]}
-- Bounded by the HSCAN's reply (COUNT 256: a few hundred entries).
for i = 1, #found[2], 2 do
  local member = found[2][i]
  if load(Q, member).ten == nil then
    out[#out + 1] = member
    out[#out + 1] = redis.call('HGET', Q.body, member)
  end
end
return out
