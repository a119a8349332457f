-- score_fill: part of indexing a queue stored before the score policy's index existed
-- (global_choice.py): ARGV[5] an HSCAN cursor over the messages' states. Adds each visible
-- message of the scanned part to the index (score_index.lua; one indexed already is left as it
-- is) and, when the scan is done, marks the queue scored. Returns the next cursor ('0': done).
-- Messages that become visible meanwhile are indexed by the scripts that show them.
if score_layout_earlier(Q) then
  score_index_drop(Q) -- an earlier layout (score_index.lua): filled again from scratch
end
local found = redis.call('HSCAN', Q.state, ARGV[5], 'COUNT', 256)
-- Bounded by the HSCAN's reply (COUNT 256: a few hundred entries).
for i = 1, #found[2], 2 do
  local member = found[2][i]
  local s = load(Q, member)
  if redis.call('ZSCORE', Q.vis[s.p + 1], member) then
    score_index_add(Q, member, s)
  end
end
if found[1] == '0' then
  redis.call('HSET', Q.meta, 'scored', '1')
end
return found[1]
