-- The score policy's exact winner over the whole queue, from its index (score_index.lua): the
-- branch-and-bound walk of the in-memory selection (rust/select.rs, best_candidate), with the
-- factor functions of rust/scoring.rs. Part of score_dispatch.lua.
--
-- The cells of the tier ranked are read in one call (URGENT's alone while URGENT ranks first;
-- the others' only when no URGENT cell holds a candidate). A cell is bounded from its summary
-- alone: its priority and retry parts, the best efficiency + token fit over its token range,
-- and the most any of its steps scores: a band's time factor (a band: its members whose
-- processing times fall in one bucket, counted at the bucket's lowest time) with the wait of
-- that band's oldest member. Cells are bounded in the
-- order of a looser bound that needs no summary (the time and wait factors at 1: per priority
-- and retry class, outwards from the token class where the budget part peaks), until none left
-- can bound higher than the best bound found; then, best bound first, each cell whose bound
-- reaches the best score found is walked (those not bounded yet are bounded while their loose
-- bound does). On a long backlog, whose cells bound alike but for their estimates, a dispatch
-- bounds a few cells and walks one; on a fresh queue, whose cells' oldest members wait alike,
-- each band's own wait tells them apart: a cell's entry holds its steps (score_index.lua: the
-- bands whose bucket beats every older band's, each with its oldest member), which bound it
-- as tightly as all its bands would, however far its best bands are drained.
-- Inside a cell the classes are scored from their entries (a class's head is its best member).
-- A cell whose oldest member waits its full factor has its classes walked by processing time
-- and then the larger estimate, which stops at the first time, or below half the capacity the
-- first estimate, that cannot win. Another cell is walked band by band, the best bucket first,
-- each band's heads oldest first (each scored with its own time), stopping at the first head
-- whose wait cannot win with the bucket's lowest time and at the first band that cannot win
-- with the longest wait; past BANDS_READ bands it reads the cell's bands (each with its oldest
-- member) and goes straight to the next one that can win. A band whose HEAD_WALK oldest heads
-- were scored has its other classes walked by time and estimate (where heads wait alike,
-- walking them by age would read every one). A class whose score cannot win is left before its
-- member is read. So a dispatch's cost
-- grows with the non-empty cells and the distinct estimates and times inside the cells
-- visited, not with the number of messages.
--
-- Scores are summed in the order of rust/scoring.rs (priority, efficiency, wait, retry, token
-- fit, processing time) from the server's instant; ties go to the older message, then the one
-- enqueued first. Bounds are raised by BOUND_SLACK (as rust/scoring.rs) so they stay bounds.
--
-- About 755 lines in one file: the ranking is one closure (score_ranker) whose walks share the
-- call's weights, capacities and caches as upvalues; a script is one chunk, so a second file
-- would be pasted beside this one anyway, and its functions would take those as arguments.

local BOUND_SLACK = 1e-9
local CLASS_PAGE = 128 -- classes of a cell read per call
local CLASS_FIRST = 16 -- classes read by the first call, and by the first after a jump past the
                       -- rest of a time (the walk mostly stops early there)
local HEAD_WALK = 4 -- heads of a band scored oldest first before its classes are walked
local BANDS_READ = 2 -- bands a walk enters one after the other before it reads the cell's bands
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

-- A ranker for weights W (priority, efficiency, wait, retry, token fit, processing time),
-- capacity C (A of the formulas: the budget is held, so the smallest capacity of the limiter's
-- token limits, as rust/policy.rs ranking_budget), the largest estimate ranked M (at least C:
-- the limits that count the whole estimate; a request split into input and output parts may
-- fit the others by its parts, which the limiter checks when it wins), and whether URGENT
-- ranks first.
local function score_ranker(W, C, M, urgent_first)
  local ranker = {}
  -- The builtins the ranking calls a few thousand times per dispatch, as upvalues: a script's
  -- global lookup (string, then sub) costs about as much as the call (callgrind, redis-server
  -- 7.0: two string.sub through the globals 1,820 instructions, through upvalues 1,460).
  local sub, byte, tonumber = string.sub, string.byte, tonumber
  local sqrt, min, max, floor = math.sqrt, math.min, math.max, math.floor
  local W3 = W[3]

  -- W[3] times the wait factor of a message of priority p (0..3) enqueued at `at` (us): the
  -- product wait_part(at, p) to the bit, with the builtins as upvalues.
  local function wait_part(at, p)
    local age = NOW - at
    local share = (age > 0 and age or 0) / 1000000 / MAX_WAIT_SECONDS[p + 1]
    if share > 1 then
      share = 1
    end
    if p == 0 then
      return W3 * sqrt(share)
    end
    return W3 * share
  end

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

  -- The best efficiency + token fit over a cell's token range [lo, hi] (capped at M); nil when no
  -- estimate of it is ranked (rust/scoring.rs, budget_bound: the same value, from the one
  -- point that holds it rather than from every breakpoint).
  local function budget_bound(lo, hi)
    if lo > M then
      return nil
    end
    hi = min(hi, M)
    if C <= 0 then
      return 0
    end
    return budget_of_share(min(max(peak, lo / C), hi / C))
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

  -- Per script: the facts of each token class (facts_of), the weighted processing-time factor of
  -- each time, the weighted efficiency and token fit of each estimate (the same products the
  -- exact score sums, so a score from them is the score to the bit).
  local time_part, budget_parts, token_budget = {}, {}, {}
  -- The bound of each sc_cells entry met (bound_of in ranker.best): an entry holds all its
  -- bound depends on, and the instant is the script's, so the winners of one call after the
  -- first bound again only the cells whose entries the winners before them changed.
  local cell_bounds = {}
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
    for k = 1, #heads do
      local head = heads[k]
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
  -- Read once per call: the winners after the first find them here, the cells that a winner
  -- or an expired message left read again (ranker.changed).
  local tier_entries = {}
  local function entries_of(t)
    local entries = tier_entries[t]
    if entries == nil then
      if not urgent_first then
        entries = t == 1 and {} or redis.call('ZRANGEBYLEX', Q.sc_cells, '-', '+')
      elseif t == 1 then
        entries = redis.call('ZRANGEBYLEX', Q.sc_cells, '-', '(1')
      else
        entries = redis.call('ZRANGEBYLEX', Q.sc_cells, '[1', '+')
      end
      tier_entries[t] = entries
    end
    return entries
  end

  -- The cells messages left since the tiers' entries were read (ranker.changed), each read
  -- again when the next ranking starts (none after a call's last winner).
  local changed = {}

  -- A message of cell `cell` (its 5 characters) left the index.
  function ranker.changed(cell)
    changed[#changed + 1] = cell
  end

  -- Reads the entry of a changed cell again into its tier's entries read so far (kept sorted: a
  -- cell's entry starts with the cell).
  local function read_again(cell)
    local entries = tier_entries[(urgent_first and byte(cell, 1) == 48) and 1 or 0]
    if entries == nil then
      return
    end
    local read = redis.call('ZRANGEBYLEX', Q.sc_cells, '[' .. cell, '[' .. cell .. '\255', 'LIMIT', 0, 1)[1]
    -- The first entry whose cell is not below `cell`, by binary search.
    local lo, hi = 1, #entries + 1
    -- Bounded: a binary search halves at most 2^64 entries.
    for _ = 1, 64 do
      if lo >= hi then
        break
      end
      local mid = floor((lo + hi) / 2)
      if sub(entries[mid], 1, 5) < cell then
        lo = mid + 1
      else
        hi = mid
      end
    end
    if entries[lo] ~= nil and sub(entries[lo], 1, 5) == cell then
      if read ~= nil then
        entries[lo] = read
      else
        table.remove(entries, lo)
      end
    elseif read ~= nil then
      table.insert(entries, lo, read)
    end
  end

  -- The facts of a token class (its sc_cells key, 3 digits), worked out once per call, on a
  -- fresh queue for every cell of a tier (each of its own token class): its budget bound, the
  -- value facts_of returns (false when no estimate of it is ranked); whether some of its
  -- estimates are never ranked (token_above); whether its budget part never falls as the
  -- estimate grows, below half of C (token_rising). Kept in three tables: a table per class
  -- cost about as much as the rest of its facts.
  local token_above, token_rising = {}, {}
  local function facts_of(key)
    local budget = token_budget[key]
    if budget == nil then
      local lo, hi = score_token_range(tonumber(key))
      budget = budget_bound(lo, hi) or false
      token_budget[key], token_above[key], token_rising[key] = budget, hi > M, hi <= 0.5 * C
    end
    return budget
  end

  -- What no member of a cell of priority p and retry class r can score above but for its
  -- budget part: the processing-time and wait factors at their most (1).
  local function loose_part(p, r)
    return fixed_part[p] + retry_part[r] + W[6]
  end

  -- The token class whose range holds the share of C where the budget part peaks: classes up
  -- to it have a budget bound that never falls as the class grows, the ones above it one that
  -- never rises (budget_bound takes the point of the range nearest the peak).
  local peak_tokens = peak * C

  -- The cells of a tier, given as sc_cells entries (sorted: priority, retry class, token class),
  -- in streams whose loose bounds (loose_part + budget bound + the full wait) never rise: per
  -- priority and retry class, from the class nearest the budget's peak down, and from the one
  -- above it up. `next_cell` gives the entry with the highest loose bound left and that bound
  -- (nil when none is left): every cell not yet given bounds no higher.
  local function cell_streams(entries, above)
    local streams = {}
    local n = #entries
    local i = 1
    -- Bounded by the entries (each round takes one priority and retry class, at least one entry).
    for _ = 1, n do
      if i > n then
        break
      end
      local group = sub(entries[i], 1, 2)
      -- The group's last entry, by binary search.
      local lo, hi = i, n
      -- Bounded: a binary search halves at most 2^64 entries.
      for _ = 1, 64 do
        if lo >= hi then
          break
        end
        local mid = floor((lo + hi + 1) / 2)
        if sub(entries[mid], 1, 2) == group then
          lo = mid
        else
          hi = mid - 1
        end
      end
      local last = lo
      -- The group's last class whose range starts at or below the peak (i - 1: none).
      lo, hi = i - 1, last
      -- Bounded: a binary search halves at most 2^64 entries.
      for _ = 1, 64 do
        if lo >= hi then
          break
        end
        local mid = floor((lo + hi + 1) / 2)
        if score_token_range(tonumber(sub(entries[mid], 3, 5))) <= peak_tokens then
          lo = mid
        else
          hi = mid - 1
        end
      end
      local split = lo
      -- Cells some of whose estimates are never ranked are the group's top classes.
      -- Bounded by the group's entries.
      for k = last, i, -1 do
        local key = sub(entries[k], 3, 5)
        facts_of(key)
        if not token_above[key] then
          break
        end
        above(sub(entries[k], 1, 5))
      end
      local p, r = byte(group, 1) - 48, byte(group, 2) - 48
      local loose = loose_part(p, r)
      if split >= i then
        streams[#streams + 1] = {at = split, step = -1, stop = i, loose = loose, wait = W[3]}
      end
      if split < last then
        streams[#streams + 1] = {at = split + 1, step = 1, stop = last, loose = loose, wait = W[3]}
      end
      i = last + 1
    end
    -- Each stream's loose bound at its current cell (nil: the stream is done).
    local function bound_of(stream)
      local budget = facts_of(sub(entries[stream.at], 3, 5))
      if not budget then
        return nil -- from here on no estimate is ranked (the classes only grow upwards)
      end
      return stream.loose + BOUND_SLACK + budget + stream.wait
    end
    -- Bounded by the streams.
    for k = 1, #streams do
      streams[k].bound = bound_of(streams[k])
    end
    return function()
      local top = nil
      -- Bounded by the streams (two per priority and retry class).
      for k = 1, #streams do
        local stream = streams[k]
        if stream.bound ~= nil and (top == nil or stream.bound > top.bound) then
          top = stream
        end
      end
      if top == nil then
        return nil
      end
      local entry, bound = entries[top.at], top.bound
      if top.at == top.stop then
        top.bound = nil
      else
        top.at = top.at + top.step
        top.bound = bound_of(top)
      end
      return entry, bound
    end
  end

  function ranker.best(excluded, above)
    -- Bounded by the call's winners and expired messages (a cell each).
    for k = 1, #changed do
      read_again(changed[k])
    end
    changed = {}
    -- A cell's steps (score_index.lua) from its sc_cells entry: <priority><retry class><token
    -- class: 3><oldest: enqueued_at 16, member 15>|<steps: bucket 5, enqueued_at 16>, the
    -- oldest band first (its bucket the worst of the steps); 48 is '0'. Each as its bucket and
    -- the weighted wait factor of its band's oldest member.
    local function steps_of(entry)
      local p = byte(entry, 1) - 48
      local steps = {}
      -- Bounded by the entry's steps.
      for i = 38, #entry, STEP_LEN do
        steps[#steps + 1] = {bucket = sub(entry, i, i + 4), wait = wait_part(tonumber(sub(entry, i + 5, i + 20)), p)}
      end
      return steps
    end

    -- The most the time and wait parts of a cell's members of bucket `bucket` and worse can be:
    -- a band at or past a step's bucket but below the next (older) step's waits no longer than
    -- that step's oldest (were it older, it would be a step), so each step counts its own
    -- bucket's lowest time and the first step at or below `bucket` counts `bucket`'s. nil when
    -- no step is (no member from `bucket` on can be better than none).
    local function rest_bound(steps, bucket)
      local most = nil
      -- Bounded by the cell's steps.
      for k = 1, #steps do
        local step = steps[k]
        local below = step.bucket <= bucket
        local value = time_of(below and bucket or step.bucket) + step.wait
        if most == nil or value > most then
          most = value
        end
        if below then
          break -- younger steps have better buckets: their bands come before `bucket`
        end
      end
      return most
    end

    -- A cell's bound from its entry alone: its priority and retry parts, its budget bound, and
    -- the most any step's bucket's lowest time and its band's oldest wait score.
    local function bound_of(entry)
      local known = cell_bounds[entry]
      if known ~= nil then
        return known
      end
      local p = byte(entry, 1) - 48
      local most = nil
      local longest = MAX_WAIT_SECONDS[p + 1]
      -- Bounded by the entry's steps (read in place: every cell of the tier is bounded).
      for i = 38, #entry, STEP_LEN do
        local bucket = sub(entry, i, i + 4)
        -- wait_part(at, p), inlined: a call costs about as much as its arithmetic.
        local age = NOW - tonumber(sub(entry, i + 5, i + 20))
        local share = (age > 0 and age or 0) / 1000000 / longest
        if share > 1 then
          share = 1
        end
        local value = (time_part[bucket] or time_of(bucket)) + (p == 0 and W3 * sqrt(share) or W3 * share)
        if most == nil or value > most then
          most = value
        end
      end
      known = fixed_part[p] + retry_part[byte(entry, 2) - 48] + BOUND_SLACK + facts_of(sub(entry, 3, 5))
        + most
      cell_bounds[entry] = known
      return known
    end

    -- The facts of the cell of sc_cells entry `entry` (of tier `t`), for its walk.
    local function cell_at(entry, t, bound)
      local p = byte(entry, 1) - 48
      local key = sub(entry, 3, 5)
      return {
        cell = sub(entry, 1, 5), p = p, tier = t, fixed = fixed_part[p],
        retry = retry_part[byte(entry, 2) - 48], budget = token_budget[key], rising = token_rising[key],
        oldest = tonumber(sub(entry, 6, 21)), steps = steps_of(entry), bound = bound,
      }
    end
    local best = nil
    local classes_held = nil -- the classes of every cell (read once, by the first classes walk)

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
      local member = is_head and sub(entry, 27, -33) or sub(entry, CLASS_LEN + 17)
      if excluded[member] then
        local prefix = is_head and sub(entry, 1, 5) .. sub(entry, -32) or sub(entry, 1, CLASS_LEN)
        at, member = head_of(prefix, excluded)
        if member == nil then
          return
        end
        value = f.fixed + parts[1] + wait_part(at, f.p) + f.retry + parts[2] + pt
      end
      if beats(f.tier, value, at, member, best) then
        best = {member = member, score = value, tier = f.tier, at = at}
      end
    end

    -- The classes of a cell, or of one band of it (`from` and `to`: the range of their
    -- sc_classes entries), by processing time, then the larger estimate, none waiting longer
    -- than `wait`: the walk
    -- stops at the first time that cannot win with the cell's best budget part and that wait;
    -- inside one time, where the budget part never falls as the estimate grows (the cell below
    -- half the capacity), at the first estimate that cannot win.
    local function walk_classes(c, wait, from, to)
      local f = c
      local static = f.fixed + f.retry
      local passed = nil -- a time whose remaining (smaller) estimates cannot win
      -- Each round reads a page from `from` on; the next starts after it, or after the rest of
      -- a time whose smaller estimates cannot win when the page ends inside it (then a short
      -- page: on a backlog the next time's first class ends the walk).
      local page = CLASS_FIRST
      classes_held = classes_held or redis.call('ZCARD', Q.sc_classes)
      -- Each round but the last reads a full page of at least CLASS_FIRST classes of the cell.
      -- Bounded by the cell's classes, at most as many as the index holds.
      for _ = 0, 1 + floor(classes_held / CLASS_FIRST) do
        local classes = redis.call('ZRANGEBYLEX', Q.sc_classes, from, to, 'LIMIT', 0, page)
        -- Bounded by `page` (the LIMIT above).
        for k = 1, #classes do
          local entry = classes[k]
          local hex = sub(entry, 6, 21)
          if hex ~= passed then
            local pt = time_part[hex] or time_of(hex)
            local floor = static + pt + BOUND_SLACK
            if not may_beat(f.tier, floor + f.budget + wait, best) then
              return
            end
            local tokens = entry_tokens(entry)
            if tokens <= M then
              local parts = parts_of(tokens)
              if may_beat(f.tier, floor + parts[1] + parts[2] + wait, best) then
                local at = tonumber(sub(entry, CLASS_LEN + 1, CLASS_LEN + 16))
                consider(c, tokens, pt, at, wait_part(at, f.p), entry, false)
              elseif f.rising then
                passed = hex -- the rest of this time: smaller estimates, no larger budget part
              end
            end
          end
        end
        if #classes < page then
          return
        end
        local last = classes[#classes]
        if sub(last, 6, 21) == passed then
          from = '(' .. c.cell .. passed .. '\255'
          page = CLASS_FIRST
        else
          from = '(' .. last
          page = CLASS_PAGE
        end
      end
    end

    -- A cell's bands, the best bucket first, each by its heads oldest first: a band is left at
    -- the first head whose wait cannot win with its bucket's lowest time and the cell's best
    -- budget part (its later heads wait no longer), and the walk where no band from there on
    -- can win so (rest_bound, from the cell's steps); each head is scored with its own time. A
    -- band whose HEAD_WALK oldest heads were scored has its other classes walked by time and
    -- estimate, none of them waiting longer than its next head (where heads wait alike, as on
    -- a backlog whose waits are full, walking them by age would read every head of the band).
    local function walk_bands(c)
      local f = c
      local static = f.fixed + f.retry + BOUND_SLACK + f.budget
      local from, to = '[' .. c.cell, '[' .. c.cell .. '\255'
      local band, pt, left, walked = nil, nil, false, 0
      local entered = 0 -- bands entered
      -- The cell's bands (buckets) and what each can score at most (with its lowest time and its
      -- oldest member's wait, beside `static`), read from sc_ages once the walk has entered
      -- BANDS_READ bands: past them it goes straight to the next band that can win.
      local buckets, most = nil, nil
      local function next_band()
        if buckets == nil then
          buckets, most = {}, {}
          local bands = redis.call('ZRANGEBYLEX', Q.sc_ages, '[~' .. c.cell, '[~' .. c.cell .. '\255')
          -- Bounded by the cell's bands: at most its buckets (the times are clamped to 1 s .. 30 s).
          for k = 1, #bands do
            -- ~<cell: 5><its oldest member's enqueued_at: 16><bucket: 5>
            local bucket = sub(bands[k], 23, 27)
            buckets[k] = bucket
            most[k] = (time_part[bucket] or time_of(bucket)) + wait_part(tonumber(sub(bands[k], 7, 22)), f.p)
          end
        end
        local found = nil
        -- Bounded by the cell's bands.
        for k = 1, #buckets do
          local bucket = buckets[k]
          if bucket > band and (found == nil or bucket < found) and may_beat(f.tier, static + most[k], best) then
            found = bucket
          end
        end
        return found
      end
      classes_held = classes_held or redis.call('ZCARD', Q.sc_classes)
      -- Each round but the last reads HEAD_WALK + 1 heads of the cell and moves past at least one.
      -- Bounded by the cell's heads, at most as many as the index holds classes.
      for _ = 0, classes_held do
        local heads = redis.call('ZRANGEBYLEX', Q.sc_heads, from, to, 'LIMIT', 0, HEAD_WALK + 1)
        -- Bounded by HEAD_WALK + 1 (the LIMIT above).
        for k = 1, #heads do
          local head = heads[k]
          -- <cell><bucket: 5><enqueued_at: 16><member><time: 16><2^53 - estimate: 16>
          local hex = sub(head, 6, 10)
          if hex ~= band then
            band, pt, left, walked = hex, time_part[hex] or time_of(hex), false, 0
            entered = entered + 1
            if not may_beat(f.tier, static + rest_bound(c.steps, band), best) then
              return
            end
          end
          if not left then
            local at = tonumber(sub(head, 11, 26))
            local own = wait_part(at, f.p)
            if not may_beat(f.tier, static + pt + own, best) then
              left = true
            elseif walked >= HEAD_WALK then
              walk_classes(c, own, '[' .. c.cell .. band, '(' .. c.cell .. bucket_after(band))
              left = true
            else
              walked = walked + 1
              local tokens = TOKENS_TOP - tonumber(sub(head, -16))
              if tokens <= M then
                local hex_time = sub(head, -32, -17)
                consider(c, tokens, time_part[hex_time] or time_of(hex_time), at, own, head, true)
              end
            end
          end
        end
        if #heads <= HEAD_WALK then
          return
        end
        if left and not may_beat(f.tier, static + rest_bound(c.steps, bucket_after(band)), best) then
          return -- no later band can win
        end
        if not left then
          from = '(' .. heads[#heads]
        elseif entered < BANDS_READ then
          from = '(' .. c.cell .. band .. '\255'
        else
          local bucket = next_band()
          if bucket == nil then
            return -- no later band can win
          end
          from = '[' .. c.cell .. bucket
        end
      end
    end

    -- A cell whose oldest member's wait is full (a backlog's) has its classes walked at once:
    -- no class can wait longer, so reading its oldest heads first would tell nothing more.
    local function walk(c)
      if NOW - c.oldest >= MAX_WAIT_SECONDS[c.p + 1] * 1000000 then
        walk_classes(c, wait_part(c.oldest, c.p), '[' .. c.cell, '[' .. c.cell .. '\255')
        return
      end
      walk_bands(c)
    end

    -- The cells of the higher tier first (only when none of them holds a candidate can a cell
    -- of the lower tier hold the winner), best bound first: cells are bounded from their
    -- summaries in the order of their loose bounds (cell_streams), until none left can bound
    -- higher than the best bound found. Then, as long as a cell's bound reaches the best score
    -- found, the cell of the highest bound is walked; a cell not bounded yet is bounded when
    -- its loose bound is the highest. On a long backlog, whose cells bound alike but for their
    -- estimates, the walk reads a few cells' summaries and visits one; on a fresh queue, whose
    -- cells' oldest members wait alike, the steps (each band's own wait) tell the cells apart.
    -- Bounded by the two tiers.
    for tier_walked = 1, 0, -1 do
      if best == nil then
        local entries = entries_of(tier_walked)
        local next_cell = cell_streams(entries, above)
        local cells, bounds, done, top = {}, {}, {}, nil
        local entry, loose = next_cell()
        -- Bounded by the tier's cells (each given once).
        for _ = 0, #entries do
          if entry == nil or (top ~= nil and loose < bounds[top]) then
            break
          end
          local n = #cells + 1
          cells[n] = entry
          bounds[n] = bound_of(entry)
          if top == nil or bounds[n] > bounds[top] then
            top = n
          end
          entry, loose = next_cell()
        end
        -- Each round bounds a cell or walks one (each cell once), or ends.
        -- Bounded by two rounds per cell of the tier.
        for _ = 0, 2 * #entries do
          if entry ~= nil and (top == nil or loose > bounds[top]) then
            if not may_beat(tier_walked, loose, best) then
              break -- no cell left bounds higher
            end
            local n = #cells + 1
            cells[n] = entry
            bounds[n] = bound_of(entry)
            if top == nil or bounds[n] > bounds[top] then
              top = n
            end
            entry, loose = next_cell()
          else
            if top == nil or not may_beat(tier_walked, bounds[top], best) then
              break -- every cell left bounds no higher
            end
            walk(cell_at(cells[top], tier_walked, bounds[top]))
            done[top] = true
            top = nil
            -- Bounded by the cells bounded.
            for k = 1, #cells do
              if not done[k] and (top == nil or bounds[k] > bounds[top]) then
                top = k
              end
            end
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
