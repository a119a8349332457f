-- The score policy's exact winner over the whole queue, from its index (score_index.lua): the
-- branch-and-bound walk of the in-memory selection (rust/select.rs, best_candidate), with the
-- factor functions of rust/scoring.rs. Part of score_dispatch.lua.
--
-- Every non-empty cell is bounded from its summary alone (one HGETALL): its priority and retry
-- parts, the best efficiency + token fit over its token range, the processing-time factor of
-- its best member, the wait of its oldest. Cells are visited best bound first (URGENT ones
-- first while URGENT ranks first; the others are bounded only when no URGENT one holds a
-- candidate); the walk stops at the first cell that cannot beat the best found. Inside a cell
-- the classes are scored from their entries (a class's head is its best member): first the
-- HEAD_WALK oldest heads, which stops at the first head whose wait cannot win; then, bounded
-- by the wait of the next head (no class left waits longer), by processing time and then the
-- larger estimate, which stops at the first time, or below half the capacity the first
-- estimate, that cannot win (where heads wait alike, as on a fresh queue or a backlog whose
-- waits are full, walking them by age would read every head older than the winner). A class
-- whose score cannot win is left before its member is read. So a dispatch reads every cell's
-- summary and, in the cells it visits, the classes that can still win: its cost grows with
-- the non-empty cells and the distinct estimates and times inside the cells visited, not with
-- the number of messages.
--
-- Scores are summed in the order of rust/scoring.rs (priority, efficiency, wait, retry, token
-- fit, processing time) from the server's instant; ties go to the older message, then the one
-- enqueued first. Bounds are raised by BOUND_SLACK (as rust/scoring.rs) so they stay bounds.

local BOUND_SLACK = 1e-9
local CLASS_PAGE = 128 -- classes of a cell read per call
local CLASS_FIRST = 16 -- classes of a cell read by the first call (the walk mostly stops early)
local HEAD_WALK = 4 -- heads of a cell read oldest first before its classes are walked
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
-- capacity C (A of the formulas: the budget is held, so the smallest capacity of the limiter's
-- token limits, as rust/policy.rs ranking_budget), the largest estimate ranked M (at least C:
-- the limits that count the whole estimate; a request split into input and output parts may
-- fit the others by its parts, which the limiter checks when it wins), and whether URGENT
-- ranks first.
local function score_ranker(W, C, M, urgent_first)
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

  -- Efficiency + token fit of a share u of C (weighted).
  local function budget_of_share(u)
    return W[2] * efficiency_of_share(u) + W[5] * token_fit_of_share(u)
  end

  -- Where budget_of_share peaks: it rises up to u = 0.5 (both factors do, or one is flat),
  -- runs straight from 0.5 to 0.7 (efficiency rising, token fit falling), and never rises past
  -- 0.7 (efficiency flat then dropping at 0.9 and 1, token fit falling). So over an interval
  -- its largest value is at the point of the interval nearest to the peak.
  local peak = budget_of_share(0.7) > budget_of_share(0.5) and 0.7 or 0.5

  -- The best efficiency + token fit over a cell's token range (capped at M); nil when no
  -- estimate of it is ranked (rust/scoring.rs, budget_bound: the same value, from the one
  -- point that holds it rather than from every breakpoint).
  local function budget_bound(class)
    local lo, hi = score_token_range(class)
    if lo > M then
      return nil
    end
    hi = math.min(hi, M)
    if C <= 0 then
      return 0
    end
    return budget_of_share(math.min(math.max(peak, lo / C), hi / C))
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
  local class_budget, time_part, budget_parts, token_facts = {}, {}, {}, {}
  -- The weighted priority part of each priority, the weighted retry part of each retry class.
  local fixed_part, retry_part = {}, {}
  -- Bounded: four priorities.
  for p = 0, 3 do
    fixed_part[p] = W[1] * PRIORITY_FACTOR[p + 1]
  end
  -- Bounded: eight retry classes.
  for r = 0, 7 do
    retry_part[r] = W[4] * retry_factor(r)
  end

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

  -- The oldest member not in `excluded` of the class whose sc_members entries start with
  -- `prefix`, whose head is excluded: its enqueued_at and member, or nil (at most SKIP_MAX
  -- members are skipped per call, each once: a few entries more than the excluded ones are read).
  local function head_of(prefix, excluded)
    local heads = redis.call('ZRANGEBYLEX', Q.sc_members, '[' .. prefix, '[' .. prefix .. '\255', 'LIMIT', 0, 1 + excluded.n)
    -- Bounded by the LIMIT above.
    for _, head in ipairs(heads) do
      if not excluded[entry_member(head)] then
        return entry_at(head), entry_member(head)
      end
    end
    return nil
  end

  -- The best message not in `excluded` (member -> true) that fits C: {member, score, tier, at,
  -- s}; or nil. `above` is called with each cell some of whose estimates never fit C.
  -- The sc_cells entries of tier `t`'s cells (<cell><summary>): one priority's are one range
  -- of the index (URGENT's alone while URGENT ranks first, the others' only after).
  local function entries_of(t)
    if not urgent_first then
      return t == 1 and {} or redis.call('ZRANGEBYLEX', Q.sc_cells, '-', '+')
    elseif t == 1 then
      return redis.call('ZRANGEBYLEX', Q.sc_cells, '-', '(1')
    end
    return redis.call('ZRANGEBYLEX', Q.sc_cells, '[1', '+')
  end

  function ranker.best(excluded, above)
    local entries
    -- The admissible cells of tier `t`: for each, its sc_cells entry and its bound, in two
    -- lists (no table per cell: most cells are bounded and never visited), and the place in
    -- those lists of the highest bound. The lower tier's are read and bounded only when no
    -- cell of the higher holds a candidate.
    local function cells_of(t)
      local cells, bounds, top = {}, {}, nil
      local n = 0
      local wait_weight = W[3]
      -- Bounded by the tier's non-empty cells (the range just read).
      for _, entry in ipairs(entries_of(t)) do
        -- <priority><retry class><token class: 3><oldest: enqueued_at 16, member 15><best time:
        -- 16 hex digits><count>; 48 is '0'.
        local p = string.byte(entry, 1) - 48
        local key = string.sub(entry, 3, 5)
        local token = token_facts[key]
        if token == nil then
          local class = tonumber(key)
          local _, hi = score_token_range(class)
          token = {budget = budget_of(class), above = hi > M, rising = hi <= 0.5 * C}
          token_facts[key] = token
        end
        if token.above then
          above(string.sub(entry, 1, 5)) -- some of its estimates (or all) never fit
        end
        if token.budget then
          n = n + 1
          cells[n] = entry
          bounds[n] = fixed_part[p] + retry_part[string.byte(entry, 2) - 48] + time_of(string.sub(entry, 37, 52))
            + BOUND_SLACK + token.budget + wait_weight * wait_factor(tonumber(string.sub(entry, 6, 21)), p)
          if top == nil or bounds[n] > bounds[top] then
            top = n
          end
        end
      end
      return cells, bounds, top
    end

    -- The facts of the cell of sc_cells entry `entry` (of tier `t`), for its walk.
    local function cell_at(entry, t, bound)
      local p = string.byte(entry, 1) - 48
      local token = token_facts[string.sub(entry, 3, 5)]
      local summary = string.sub(entry, 6)
      return {
        cell = string.sub(entry, 1, 5), p = p, tier = t, fixed = fixed_part[p],
        retry = retry_part[string.byte(entry, 2) - 48], budget = token.budget, rising = token.rising,
        summary = summary, time = time_of(string.sub(summary, 32, 47)), bound = bound,
      }
    end
    local best = nil

    -- Scores a class of cell c (its estimate `tokens`, processing-time part `pt`) whose head
    -- was enqueued at `at` and waits `wait` (the weighted factor); `entry` is its sc_heads entry
    -- when `is_head`, else its sc_classes entry, whose member is read only when the score can
    -- win. When that head is excluded, the class's oldest member not excluded is scored.
    local function consider(c, tokens, pt, at, wait, entry, is_head)
      local f, parts = c, parts_of(tokens)
      -- rust/scoring.rs order: priority, efficiency, wait, retry, token fit, time.
      local value = f.fixed + parts[1] + wait + f.retry + parts[2] + pt
      if best ~= nil and f.tier == best.tier and value < best.score then
        return -- a later member of the class waits no longer: none of them wins
      end
      local member = is_head and string.sub(entry, 22, -33) or string.sub(entry, CLASS_LEN + 17)
      if excluded[member] then
        local prefix = is_head and string.sub(entry, 1, 5) .. string.sub(entry, -32) or string.sub(entry, 1, CLASS_LEN)
        at, member = head_of(prefix, excluded)
        if member == nil then
          return
        end
        value = f.fixed + parts[1] + W[3] * wait_factor(at, f.p) + f.retry + parts[2] + pt
      end
      if beats(f.tier, value, at, member, best) then
        best = {member = member, score = value, tier = f.tier, at = at}
      end
    end

    -- A cell's first HEAD_WALK classes by their heads, oldest first: each later head waits no
    -- longer, so the walk stops at the first that cannot win with the cell's best time and
    -- budget part. Returns whether it got that far (or through the cell); else the weighted
    -- wait of the first head not read, which no class left waits longer than: the classes
    -- walk, by time and estimate, follows with it.
    local function walk_heads(c)
      local f = c
      local heads = redis.call('ZRANGEBYLEX', Q.sc_heads, '[' .. c.cell, '[' .. c.cell .. '\255', 'LIMIT', 0, HEAD_WALK + 1)
      -- Bounded by HEAD_WALK + 1 (the LIMIT above).
      for i, head in ipairs(heads) do
        -- <cell><enqueued_at: 16><member><time: 16><2^53 - estimate: 16>
        local at = tonumber(string.sub(head, 6, 21))
        local wait = W[3] * wait_factor(at, f.p)
        if not may_beat(f.tier, f.fixed + f.retry + c.time + BOUND_SLACK + f.budget + wait, best) then
          return true
        end
        if i > HEAD_WALK then
          return false, wait
        end
        local tokens = TOKENS_TOP - tonumber(string.sub(head, -16))
        if tokens <= M then
          consider(c, tokens, time_of(string.sub(head, -32, -17)), at, wait, head, true)
        end
      end
      return true
    end

    -- A cell's classes by processing time, then the larger estimate: the walk stops at the
    -- first time that cannot win with the cell's best budget part and longest wait; inside one
    -- time, where the budget part never falls as the estimate grows (the cell below half the
    -- capacity), at the first estimate that cannot win.
    local function walk_classes(c, wait)
      local f = c
      local static = f.fixed + f.retry
      local from, to = '[' .. c.cell, '[' .. c.cell .. '\255'
      local passed = nil -- a time whose remaining (smaller) estimates cannot win
      -- Each round reads a page from `from` on; the next starts after it, or after the rest of
      -- a time whose smaller estimates cannot win when the page ends inside it.
      local page = CLASS_FIRST
      -- Bounded by the cell's classes, at most as many as its members (a page per round).
      for _ = 0, 1 + math.floor(tonumber(string.sub(c.summary, 48)) / CLASS_PAGE) do
        local classes = redis.call('ZRANGEBYLEX', Q.sc_classes, from, to, 'LIMIT', 0, page)
        -- Bounded by `page` (the LIMIT above).
        for _, entry in ipairs(classes) do
          local hex = string.sub(entry, 6, 21)
          if hex ~= passed then
            local pt = time_of(hex)
            local floor = static + pt + BOUND_SLACK
            if not may_beat(f.tier, floor + f.budget + wait, best) then
              return
            end
            local tokens = entry_tokens(entry)
            if tokens <= M then
              local parts = parts_of(tokens)
              if may_beat(f.tier, floor + parts[1] + parts[2] + wait, best) then
                local at = tonumber(string.sub(entry, CLASS_LEN + 1, CLASS_LEN + 16))
                consider(c, tokens, pt, at, W[3] * wait_factor(at, f.p), entry, false)
              elseif f.rising then
                passed = hex -- the rest of this time: smaller estimates, no larger budget part
              end
            end
          end
        end
        if #classes < page then
          return
        end
        page = CLASS_PAGE
        local last = classes[#classes]
        if string.sub(last, 6, 21) == passed then
          from = '(' .. c.cell .. passed .. '\255'
        else
          from = '(' .. last
        end
      end
    end

    -- A cell whose oldest member's wait is full (a backlog's) has its classes walked at once:
    -- no class can wait longer, so reading its oldest heads first would tell nothing more.
    local function walk(c)
      local at = tonumber(string.sub(c.summary, 1, 16))
      if NOW - at >= MAX_WAIT_SECONDS[c.p + 1] * 1000000 then
        walk_classes(c, W[3] * wait_factor(at, c.p))
        return
      end
      local done, wait = walk_heads(c)
      if not done then
        walk_classes(c, wait)
      end
    end

    -- The cells of the higher tier first (only when none of them holds a candidate can a cell
    -- of the lower tier hold the winner), best bound first: the best-bounded cell, then, best
    -- bound first, the others whose bound reaches the best score it gave (most often none on a
    -- long backlog, whose cells bound alike but for their estimates). Bounded by the two tiers.
    for tier_walked = 1, 0, -1 do
      if best == nil then
        local cells, bounds, top = cells_of(tier_walked)
        if top ~= nil then
          walk(cell_at(cells[top], tier_walked, bounds[top]))
          local left = {}
          -- Bounded by the non-empty cells.
          for k = 1, #cells do
            if k ~= top and may_beat(tier_walked, bounds[k], best) then
              left[#left + 1] = {entry = cells[k], bound = bounds[k]}
            end
          end
          table.sort(left, function(a, b) return a.bound > b.bound end)
          -- Bounded by the non-empty cells.
          for _, c in ipairs(left) do
            if not may_beat(tier_walked, c.bound, best) then
              break -- every cell left bounds no higher
            end
            walk(cell_at(c.entry, tier_walked, c.bound))
          end
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
