-- The score policy's exact winner over the whole queue, from its index (score_index.lua): the
-- branch-and-bound walk of the in-memory selection (rust/select.rs, best_candidate), with the
-- factor functions of rust/scoring.rs. Part of score_dispatch.lua.
--
-- Every non-empty cell is bounded from its summary alone (one HGETALL): its priority and retry
-- parts, the best efficiency + token fit over its token range, the processing-time factor of
-- its best member, the wait of its oldest. Cells are visited best bound first; inside one, each
-- class is bounded the same way with its exact estimate and time, and only a class that can
-- still beat the best found has its head (its oldest member, the best of the class) read and
-- scored exactly. The walk stops at the first cell that cannot beat the best. So a dispatch
-- reads every cell's summary and the heads of the few classes that can win: its cost grows
-- with the non-empty cells, not with the queue.
--
-- Scores are summed in the order of rust/scoring.rs (priority, efficiency, wait, retry, token
-- fit, processing time) from the server's instant; ties go to the older message, then the one
-- enqueued first. Bounds are raised by BOUND_SLACK (as rust/scoring.rs) so they stay bounds.

local BOUND_SLACK = 1e-9
local CLASS_PAGE = 128 -- classes of a cell read per call
local PRIORITY_FACTOR = {1.0, 0.7, 0.4, 0.1}
local MAX_WAIT_SECONDS = {10.0, 30.0, 60.0, 300.0}

local function efficiency_of_share(u)
  if u > 1 then
    return 0
  elseif u >= 0.7 and u <= 0.9 then
    return 1
  elseif u > 0.9 then
    return 0.9
  end
  return u / 0.7
end

local function token_fit_of_share(u)
  if u > 1 then
    return 0
  elseif u < 0.1 then
    return 10 * u
  elseif u <= 0.5 then
    return 1
  end
  return 1 - (u - 0.5) * 0.4
end

local function processing_time_factor(ms)
  if ms <= 1000 then
    return 1
  elseif ms <= 5000 then
    return 1 - (ms - 1000) / 4000 * 0.3
  elseif ms <= 30000 then
    return 0.7 - (ms - 5000) / 25000 * 0.6
  end
  return 0.1
end

local function retry_factor(count)
  if count == 0 then
    return 1
  end
  return math.max(0.1, 0.7 ^ math.min(count, 64))
end

-- The wait factor of a message of priority p (0..3) enqueued at `at` (us).
local function wait_factor(at, p)
  local share = math.min(math.max(NOW - at, 0) / 1000000 / MAX_WAIT_SECONDS[p + 1], 1)
  if p == 0 then
    return math.sqrt(share)
  end
  return share
end

-- A ranker for weights W (priority, efficiency, wait, retry, token fit, processing time),
-- capacity C (A of the formulas: the budget is held, so the limiter's token capacity), and
-- whether URGENT ranks first.
local function score_ranker(W, C, urgent_first)
  local ranker = {}

  local function efficiency(tokens)
    if C <= 0 then
      return 0
    end
    return efficiency_of_share(tokens / C)
  end

  local function token_fit(tokens)
    if C <= 0 then
      return 0
    end
    return token_fit_of_share(tokens / C)
  end

  local function tier(p)
    return (urgent_first and p == 0) and 1 or 0
  end

  -- The best efficiency + token fit over a cell's token range (capped at C); nil when no
  -- estimate of it fits C (rust/scoring.rs, budget_bound).
  local function budget_bound(class)
    local lo, hi = score_token_range(class)
    if lo > C then
      return nil
    end
    hi = math.min(hi, C)
    if C <= 0 then
      return 0
    end
    local u_lo, u_hi = lo / C, hi / C
    local best = 0
    -- Bounded: the range's ends and the factors' five breakpoints.
    for _, u in ipairs({u_lo, u_hi, 0.1, 0.5, 0.7, 0.9, 1.0}) do
      if u >= u_lo and u <= u_hi then
        best = math.max(best, W[2] * efficiency_of_share(u) + W[5] * token_fit_of_share(u))
      end
    end
    return best
  end

  -- Whether (tier, score, at, member) ranks before `best` (nil: nothing found yet).
  local function beats(t, value, at, member, best)
    if best == nil or t ~= best.tier then
      return best == nil or t > best.tier
    elseif value ~= best.score then
      return value > best.score
    elseif at ~= best.at then
      return at < best.at
    end
    return member < best.member
  end

  -- A bound beats `best` unless it is below its score (a bound equal to it may hide an older
  -- message).
  local function may_beat(t, bound, best)
    return best == nil or t > best.tier or (t == best.tier and bound >= best.score)
  end

  -- Per script: the budget part of each token class, the weighted processing-time factor of
  -- each time, the weighted efficiency and token fit of each estimate (the same products the
  -- exact score sums, so a score from them is the score to the bit).
  local class_budget, time_part, budget_parts = {}, {}, {}

  local function budget_of(class)
    local known = class_budget[class]
    if known == nil then
      known = budget_bound(class) or false
      class_budget[class] = known
    end
    return known
  end

  local function time_of(hex)
    local known = time_part[hex]
    if known == nil then
      known = W[6] * processing_time_factor(ms_of(hex))
      time_part[hex] = known
    end
    return known
  end

  local function parts_of(tokens)
    local known = budget_parts[tokens]
    if known == nil then
      known = {W[2] * efficiency(tokens), W[5] * token_fit(tokens)}
      budget_parts[tokens] = known
    end
    return known
  end

  -- The best message not in `excluded` (member -> true) that fits C: {member, score, tier, at,
  -- s}; or nil. `above` is called with each cell some of whose estimates never fit C.
  function ranker.best(excluded, above)
    local cells = {}
    local summaries = redis.call('HGETALL', Q.sc_cells)
    -- Bounded by the non-empty cells (the hash just read).
    for i = 1, #summaries, 2 do
      local cell, summary = summaries[i], summaries[i + 1]
      local p, r, class = tonumber(string.sub(cell, 1, 1)), tonumber(string.sub(cell, 2, 2)), tonumber(string.sub(cell, 3))
      local budget = budget_of(class)
      if select(2, score_token_range(class)) > C then
        above(cell) -- some of its estimates (or all) never fit
      end
      if budget then
        local wait = W[3] * wait_factor(tonumber(string.sub(summary, 1, 16)), p)
        local fixed = W[1] * PRIORITY_FACTOR[p + 1]
        local retry = W[4] * retry_factor(r)
        cells[#cells + 1] = {
          cell = cell, p = p, tier = tier(p), wait = wait, fixed = fixed, retry = retry, budget = budget,
          count = tonumber(string.sub(summary, 48)),
          bound = fixed + retry + time_of(string.sub(summary, 32, 47)) + BOUND_SLACK + budget + wait,
        }
      end
    end
    table.sort(cells, function(a, b)
      if a.tier ~= b.tier then
        return a.tier > b.tier
      end
      return a.bound > b.bound
    end)
    local best = nil
    -- Bounded by the non-empty cells.
    for _, c in ipairs(cells) do
      if not may_beat(c.tier, c.bound, best) then
        break -- every cell left bounds no higher
      end
      -- The cell's classes, the best processing time first, a page at a time: a class whose
      -- processing time cannot win even with the cell's best budget part ends the walk (every
      -- later class has no better processing time). A class is scored from its entry: its
      -- head is its best member (the oldest; the class shares everything else).
      local done = false
      local static = c.fixed + c.retry
      -- Bounded by the cell's classes, at most as many as its members (CLASS_PAGE per round).
      for page = 0, math.floor(c.count / CLASS_PAGE) do
        local classes = redis.call(
          'ZRANGEBYLEX', Q.sc_classes, '[' .. c.cell, '[' .. c.cell .. '\255', 'LIMIT', page * CLASS_PAGE, CLASS_PAGE
        )
        -- Bounded by CLASS_PAGE (the LIMIT above).
        for _, entry in ipairs(classes) do
          local pt = time_of(string.sub(entry, 6, 21))
          local floor = static + pt + BOUND_SLACK
          if not may_beat(c.tier, floor + c.budget + c.wait, best) then
            done = true
            break
          end
          local tokens = tonumber(string.sub(entry, 22, 40))
          if tokens <= C then
            local parts = parts_of(tokens)
            if may_beat(c.tier, floor + parts[1] + parts[2] + c.wait, best) then
              local at, member = tonumber(string.sub(entry, 41, 56)), string.sub(entry, 57)
              if excluded[member] then
                -- Skipped this call: the class's oldest member not excluded (at most SKIP_MAX
                -- are, each once: a few entries more than the excluded ones).
                local prefix = string.sub(entry, 1, 40)
                local heads = redis.call(
                  'ZRANGEBYLEX', Q.sc_members, '[' .. prefix, '[' .. prefix .. '\255', 'LIMIT', 0, 1 + excluded.n
                )
                member = nil
                -- Bounded by the LIMIT above.
                for _, head in ipairs(heads) do
                  if not excluded[string.sub(head, 57)] then
                    at, member = tonumber(string.sub(head, 41, 56)), string.sub(head, 57)
                    break
                  end
                end
              end
              if member ~= nil then
                -- rust/scoring.rs order: priority, efficiency, wait, retry, token fit, time.
                local value = c.fixed + parts[1] + W[3] * wait_factor(at, c.p) + c.retry + parts[2] + pt
                if beats(c.tier, value, at, member, best) then
                  best = {member = member, score = value, tier = c.tier, at = at}
                end
              end
            end
          end
        end
        if done or #classes < CLASS_PAGE then
          break
        end
      end
    end
    if best ~= nil then
      best.s = load(Q, best.member)
    end
    return best
  end

  return ranker
end
