-- index_fill: puts messages stored by a version without the ranking index into it (see
-- index_scan.lua). ARGV[5] '1' when the scan is done (the queue is then marked indexed: the
-- global choice dispatches from it), then member, tenant, estimated tokens, deadline in us (-1:
-- none), input and output tokens (-1: not given), expected processing time in seconds (-1: not
-- given), repeated. A message gone meanwhile is skipped; one indexed meanwhile is left as it is.
local count = (#ARGV - 5) / 7
-- Bounded by the call's arguments: one round per message (one index_scan reply's worth).
for i = 0, count - 1 do
  local member = ARGV[6 + 7 * i]
  local s = load(Q, member)
  if s ~= nil and s.ten == nil then
    s.ten, s.tok, s.dl = ARGV[7 + 7 * i], tonumber(ARGV[8 + 7 * i]), tonumber(ARGV[9 + 7 * i])
    s.inp, s.out, s.ept = tonumber(ARGV[10 + 7 * i]), tonumber(ARGV[11 + 7 * i]), tonumber(ARGV[12 + 7 * i])
    save(Q, member, s)
    if redis.call('ZSCORE', Q.vis[s.p + 1], member) then
      index_add(Q, member, s)
    end
  end
end
if ARGV[5] == '1' then
  redis.call('HSET', Q.meta, 'indexed', '1')
end
return 1
