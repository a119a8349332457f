-- get_approximate_message_count: the visible messages.
maintain()
local visible = 0
for p = 1, 4 do -- the four priorities
  visible = visible + redis.call('ZCARD', Q.vis[p])
end
return visible
