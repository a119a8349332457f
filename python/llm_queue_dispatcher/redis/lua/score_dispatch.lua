-- score_dispatch (the score policy without custom scorers): selects the best-scored message over
-- the whole queue (score_rank.lua), reserves its budget at the co-located RedisThrottle and
-- leases it, up to ARGV[5] winners in rank order, in one script. The script is common.lua + the
-- queue's prelude (score_index.lua, queue_common.lua) + the limiter's prelude and operations
-- wrapped as limiter_open() (redis/global_choice.py) + dispatch_common.lua + score_rank.lua +
-- this.
--
-- KEYS: as global_dispatch.lua (the queues, the limiter's five keys, this call's reply key).
-- ARGV[5] most winners  ARGV[6] visibility timeout in us  ARGV[7] the same in seconds
-- ARGV[8] the capacity of the limiter's token bucket (burst_tpm, else tpm: what a winner's
--         margin for the URGENT reserve is capped by)
-- ARGV[9 .. 14] the weights: priority, efficiency, wait time, retry, token fit, processing time
-- ARGV[15] urgent_first ('1' or '0')  ARGV[16] the URGENT reserve ('': automatic)
-- ARGV[17] min_score_threshold (a winner scoring below it is not taken: nothing is)
-- ARGV[18 ..] the limiter's own ARGV[1..14]
--
-- Returns what global_dispatch.lua returns: {NOW, '', 'unindexed'} for a queue whose messages
-- may wait outside the index; else {NOW, wait in us ('' when nothing holds), then per winner:
-- member, message id, receive count, enqueued_at, first_received_at, receipt token, serialised
-- request}. The wait is set when the best message (that can ever fit) was refused by the
-- limiter: nothing ranked below it was taken (the budget is held for it); the limiter's reason
-- follows it ({NOW, wait, reason}: the metrics' binding limit).
--
-- The rules are the in-memory score policy's with the budget held (rust/policy.rs,
-- decide_score): A is the smallest capacity of the token limits (tpm, itpm, otpm, tpd); the
-- estimates ranked are those within the limits that count the whole estimate (tpm, tpd), a
-- request whose parts can never fit the input or output limit being skipped when it wins (the
-- limiter says so); with urgent_first every URGENT message ranks above
-- every other; a non-URGENT winner leaves the URGENT reserve in the bucket unless a backlog is
-- clearing; a winner below min_score_threshold is not taken.

local SKIP_MAX = 16 -- messages skipped per call: never fitting a limit, or past retention

maintain()
local out = {fmt(NOW), ''}
if replayed(out, GREPLY) then
  return out
end

local flags = redis.call('HMGET', Q.meta, 'indexed', 'scored', 'visibility_timeout')
if flags[1] ~= '1' or flags[2] ~= '1' then
  -- Messages stored before the index existed may wait outside it: the client indexes the queue
  -- (index_scan.lua, index_fill.lua, score_fill.lua), then calls again.
  return {fmt(NOW), '', 'unindexed'}
end
if score_layout_earlier(Q) then
  -- The index of an earlier layout (score_index.lua): dropped, then filled again as above.
  score_index_drop(Q)
  return {fmt(NOW), '', 'unindexed'}
end

local limit = math.max(1, math.min(tonumber(ARGV[5]), WINNERS_MAX))
local timeout = tonumber(ARGV[6])
local capacity = tonumber(ARGV[8])
local weights = {}
-- Bounded: the six weights.
for i = 1, 6 do
  weights[i] = tonumber(ARGV[8 + i])
end
local urgent_first = ARGV[15] == '1'
local fixed_urgent = tonumber(ARGV[16])
local min_score = tonumber(ARGV[17])
local limiter_argv = {}
-- Bounded: the limiter's fourteen arguments.
for i = 1, 14 do
  limiter_argv[i] = ARGV[17 + i]
end
limiter_setup(limiter_argv, limit > 1)
-- From the limiter's settings (limiter_common.lua, ARGV[2..14]: '' where a limit is not set):
-- A of the formulas, the smallest capacity of the token limits (rust/throttle token_capacity);
-- the largest estimate ranked, the smallest capacity of those counting the whole estimate
-- (whole_token_capacity); the slowest refill of the token limits, tokens per second.
local token_capacity, whole_capacity, refill = tonumber(limiter_argv[5]), tonumber(limiter_argv[5]), tonumber(limiter_argv[3]) / 60
-- Bounded: the itpm, otpm and tpd limits, each (rate, capacity, seconds of its rate).
for _, limit in ipairs({{8, 9, 60}, {10, 11, 60}, {13, 13, 86400}}) do
  local rate, held = tonumber(limiter_argv[limit[1]]), tonumber(limiter_argv[limit[2]])
  if rate ~= nil then
    token_capacity = math.min(token_capacity, held)
    refill = math.min(refill, rate / limit[3])
    if limit[1] == 13 then
      whole_capacity = math.min(whole_capacity, held)
    end
  end
end
if flags[3] ~= ARGV[7] then
  redis.call('HSET', Q.meta, 'visibility_timeout', ARGV[7])
end


-- The URGENT reserve (rust/policy.rs, score_reserve): twice the largest of the last 64 URGENT
-- estimates, at most a quarter of the capacity, or the fixed one; none without urgent_first,
-- and none while a backlog clears (the limiter admits every visible estimate together and
-- nothing arrived for as long as the bucket takes to refill the reserve).
local function urgent_reserve()
  if not urgent_first then
    return 0
  end
  local reserve = fixed_urgent
  if reserve == nil then
    local most = nil
    -- Bounded: the list keeps 64 estimates.
    for _, value in ipairs(redis.call('LRANGE', Q.recent_urgent, 0, 63)) do
      local n = tonumber(value)
      if most == nil or n > most then
        most = n
      end
    end
    reserve = most == nil and 0 or math.min(2 * most, 0.25 * token_capacity)
  end
  if reserve <= 0 then
    return reserve
  end
  index_flush() -- 'waiting' counts the winners taken so far (hide: index_defer below)
  local arrival = tonumber(redis.call('HGET', Q.meta, 'arrival'))
  local quiet = arrival == nil or (NOW - arrival) / 1000000 >= reserve / refill
  local waiting = tonumber(redis.call('HGET', Q.meta, 'waiting')) or 0
  if quiet and limiter_admits(waiting) then
    return 0
  end
  return reserve
end

-- Messages above the whole-estimate capacity are never ranked; their submitters, if any wait,
-- hear that they never fit (they stay queued, as the per-process path leaves them). Told once:
-- the entry goes.
local told = 0
local function above(cell)
  if told >= SKIP_MAX then
    return
  end
  local classes = redis.call('ZRANGEBYLEX', Q.sc_classes, '[' .. cell, '[' .. cell .. '\255', 'LIMIT', 0, SKIP_MAX)
  -- Bounded by SKIP_MAX (the LIMIT above).
  for _, class in ipairs(classes) do
    if entry_tokens(class) > whole_capacity then
      local prefix = string.sub(class, 1, CLASS_LEN)
      local entries = redis.call('ZRANGEBYLEX', Q.sc_members, '[' .. prefix, '[' .. prefix .. '\255', 'LIMIT', 0, SKIP_MAX - told)
      -- Bounded by SKIP_MAX (the LIMIT above).
      for _, entry in ipairs(entries) do
        local s = load(Q, entry_member(entry))
        report_ended(Q, s.rid, 'RateLimitError', 'request ' .. s.rid .. ' needs more tokens than the limiter can ever '
          .. 'grant (capacity ' .. fmt(whole_capacity) .. '); it stays queued', {reason = 'tpm_limit', available_in = 'inf'})
        told = told + 1
      end
      if told >= SKIP_MAX then
        return
      end
    end
  end
end

local ranker = score_ranker(weights, token_capacity, whole_capacity, urgent_first)
local excluded = {n = 0}
local taken = {}
local skipped, expired = 0, 0
index_defer() -- the rounds' removals from the index counted once (index_flush() below)
-- Each round takes a winner, skips a message that never fits a limit or expires one past
-- retention (at most WINNERS_MAX winners, SKIP_MAX skipped and SKIP_MAX expired).
local function rounds()
  -- Bounded by `limit` winners, SKIP_MAX skipped and SKIP_MAX expired.
  for _ = 1, limit + 2 * SKIP_MAX do
    if #taken >= 2 * limit then
      break
    end
    local best = ranker.best(excluded, above)
    if best ~= nil and best.score < min_score and urgent_first and best.s.p == 0 then
      -- The best URGENT message, so every one, scores below the threshold: none is sent, none
      -- holds back the others, which rank by score alone from here on.
      ranker = score_ranker(weights, token_capacity, whole_capacity, false)
      best = ranker.best(excluded, above)
    end
    if best == nil or best.score < min_score then
      break
    end
    local member, s = best.member, best.s
    if RETENTION > 0 and NOW - s.at > RETENTION then
      -- Past the retention period, left in the index by maintain()'s bound: it expires now.
      catch_up(member, s)
      ranker.changed(score_cell(s))
      expired = expired + 1
      if expired >= SKIP_MAX then
        break
      end
    else
      local key = s.rid .. '#' .. (s.rc + 1)
      local margin = 0
      if s.p ~= 0 then
        margin = math.min(s.tok + urgent_reserve(), capacity) - s.tok
        if margin < 0 then
          margin = 0
        end
      end
      local granted = limiter_reserve(key, s, s.tok + margin)
      if granted[1] ~= 1 and granted[3] == 'inf' and skipped < SKIP_MAX then
        -- It can never fit one of the limits: skipped, it holds nothing.
        excluded[member] = true
        excluded.n = excluded.n + 1
        skipped = skipped + 1
        report_ended(Q, s.rid, 'RateLimitError', 'request ' .. s.rid .. ' needs more than the limiter can ever grant ('
          .. granted[2] .. '); it stays queued', {reason = granted[2], available_in = 'inf'})
      elseif granted[1] ~= 1 then
        if #taken == 0 then
          out[2] = granted[3] -- the wait in us: the budget is held for this winner
          out[3] = granted[2]
        end
        break
      else
        hide(Q, member, s)
        ranker.changed(score_cell(s))
        lease_deferred(out, taken, member, s, timeout)
      end
    end
  end
end
-- Redis keeps what a script wrote before an error: a round that fails leaves the winners before
-- it leased and their grants recorded, so what counts them is written before the error goes on
-- (else 'waiting' and the tenants' counts would count them visible for good, and the limiter
-- would hand their grant numbers out again).
local done, failure = pcall(rounds)
leases_flush(out)
index_flush()
limiter_flush()
if not done then
  error(failure, 0)
end
return answered(out, taken)
