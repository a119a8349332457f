-- get_approximate_message_count: the visible messages (none past the retention period).
maintain()
local visible = 0
for p = 1, 4 do -- the four priorities
  visible = visible + live_count(p)
end
return visible
