-- The score policy's ranking index (the global choice, score_rank.lua): part of the queue's
-- prelude, before queue_common.lua, whose index_add and index_remove call score_index_add and
-- score_index_remove as a message becomes visible and stops being visible.
--
-- It is the cell decomposition of the in-memory index (rust/cells.rs, rust/index.rs) and holds
-- nothing that depends on the weights or the limiter, so every process reads one index whatever
-- its configuration:
--   cell    priority, retry class (the receive count, 7 for every count from 7 on: its factor
--           is then the 0.1 floor) and token class (eight per doubling of the estimate):
--           <p><r><ccc>, 5 characters
--   class   a cell's members with one estimate and one processing time, whose scores differ
--           only by their wait: <cell><processing ms, clamped to [1 s, 30.001 s], as the 16 hex
--           digits of its double (positive doubles sort like their bits)><2^53 - estimate: 16
--           digits (the larger estimate first)>, 37 characters
--   q.sc_members  lex zset of <class><enqueued_at: 16 digits><member>: a class's oldest first
--   band    a cell's members whose processing times fall in one bucket (bucket_of: 5 hex
--           digits, 256 buckets per doubling of the time), bounded by the bucket's lowest
--           time. Bands by bucket rather than by exact time bound a cell's bands by its
--           buckets when the times come from the estimates (one band per estimate otherwise);
--           the walk inside a band still scores each class by its exact time
--   q.sc_ages     lex zset of <cell><enqueued_at><member>: a cell's oldest first; and of
--                 ~<cell><enqueued_at><bucket> for each band of a cell with its oldest
--                 member's enqueued_at: a cell's bands oldest first, after every member's entry
--                 ('~' sorts after the digits), from which the ranking bounds a cell by each
--                 bucket's lowest time with the band's own longest wait
--   q.sc_classes  lex zset of <class><its oldest member: enqueued_at and member>: a cell's
--                 classes, the best processing time first, then the larger estimate, each with
--                 its head (the best of the class), so a class is scored from its entry alone
--   q.sc_heads    lex zset of <cell><bucket><its oldest member><processing time><2^53 -
--                 estimate>: the same classes by band, each band's heads oldest first, so a
--                 band's first entry is its oldest member
--   q.sc_cells    lex zset of <cell><oldest: enqueued_at and member, 31 characters>|<steps>:
--                 the steps are the bands each of whose bucket is better than every older
--                 band's, as <bucket: 5 hex digits><its oldest member's enqueued_at: 16
--                 digits>, the cell's oldest band first and its best bucket's band last. They
--                 bound the cell whole (a member of any band has at most the time factor of the
--                 last step at or below its bucket and waits no longer than that step's
--                 oldest), so the ranking bounds a cell from its entry alone however many bands
--                 it has and however far its best bands are drained. Rewritten only when the
--                 oldest or a band's oldest changes (a cell is empty when its oldest goes and no
--                 member is left in sc_ages); one priority's cells are one range of it, read in
--                 one call (with urgent_first the URGENT tier's alone, the others' only when no
--                 URGENT message can go). An entry without the '|' after its oldest is an
--                 earlier layout's (without bands, or with a band per exact time): that index is
--                 dropped and filled again, as a hash of an earlier one is
-- Adding is idempotent (a message indexed twice is counted once), so a queue stored before
-- the index can be filled while scripts keep it (score_fill.lua). A queue whose sc_cells is
-- still the hash of an earlier layout has its index dropped and filled again.

local SCORE_MS_MIN, SCORE_MS_MAX = 1000, 30001

-- The processing time in ms the score is computed from: the expected processing time when
-- given (0 is a value), else tokens * 0.01 s (API.md, "Scoring").
local function score_ms(s)
  if s.ept ~= nil and s.ept >= 0 then
    return s.ept * 1000
  end
  return s.tok * 10
end

local function hex_of(ms)
  local bytes = struct.pack('>d', math.min(math.max(ms, SCORE_MS_MIN), SCORE_MS_MAX))
  -- The eight bytes in one format (a call per byte cost eight times the call).
  return string.format('%02x%02x%02x%02x%02x%02x%02x%02x', string.byte(bytes, 1, 8))
end

-- The time of `hex`: a time's 16 digits, or a bucket's BUCKET_LEN (the bucket's lowest time).
local ms_cache = {}
local function ms_of(hex)
  local known = ms_cache[hex]
  if known ~= nil then
    return known
  end
  local digits = hex .. string.rep('0', 16 - #hex)
  -- Its two 32-bit halves, put back together as the double's eight bytes.
  known = struct.unpack('>d', struct.pack('>I4I4', tonumber(string.sub(digits, 1, 8), 16), tonumber(string.sub(digits, 9), 16)))
  ms_cache[hex] = known
  return known
end

-- A band's bucket of processing times: the first BUCKET_LEN hex digits of a time's double (its
-- sign, exponent and top mantissa bits) with the last BUCKET_STEP - 1 of that value dropped, so
-- BUCKETS_PER_DOUBLING buckets per doubling of the time, each from its lowest time (the digits
-- followed by zeros: a time no longer than any of its members', so a factor no lower) up to the
-- next bucket's. Bucket digits sort as their times, and a class key of a time in the bucket
-- lies between <cell><bucket> and <cell><next bucket> (score_rank.lua walks a band so). A
-- cell's estimates span 2^(1/8) of each other: with estimate-derived times, a cell has at most
-- BUCKETS_PER_DOUBLING / 8 + 1 bands. A bucket's lowest time is at most 1/256 shorter than its
-- members' (the expected times users give, such as 0.5, 3 or 20 s, are their buckets' lowest
-- exactly): on a fresh queue, whose best messages score within a hair of each other, coarser
-- buckets (32 per doubling: 3 s counted as 2.94 s) left more cells bounded above the winner
-- and walked.
local BUCKET_LEN = 5
local BUCKETS_PER_DOUBLING = 256
local BUCKET_STEP = 256 / BUCKETS_PER_DOUBLING -- the 5 digits hold 8 mantissa bits

local function bucket_of(hex)
  local value = tonumber(string.sub(hex, 1, BUCKET_LEN), 16)
  return string.format('%05x', value - value % BUCKET_STEP)
end

-- The bucket after `bucket` (its digits bound the bucket's class keys from above).
local function bucket_after(bucket)
  return string.format('%05x', tonumber(bucket, 16) + BUCKET_STEP)
end

-- The token class of an estimate: 0 for none, else 1 + floor(8 log2(tokens)), corrected so the
-- estimate lies inside the class's range (score_token_range) whatever log's rounding.
local function score_token_range(class)
  if class == 0 then
    return 0, 0
  end
  local lo = 2 ^ ((class - 1) / 8) * (1 - 1e-9)
  return math.max(lo, 1), 2 ^ (class / 8) * (1 + 1e-9)
end

local function score_token_class(tokens)
  if tokens <= 0 then
    return 0
  end
  local class = 1 + math.floor(math.log(tokens) / math.log(2) * 8)
  -- Bounded: log's rounding moves a class by one at most.
  for _ = 1, 2 do
    local lo, hi = score_token_range(class)
    if tokens < lo then
      class = class - 1
    elseif tokens > hi then
      class = class + 1
    end
  end
  return class
end

local function score_cell(s)
  return s.p .. math.min(s.rc, 7) .. string.format('%03d', score_token_class(s.tok))
end

local TOKENS_TOP = 9007199254740992 -- 2^53: estimates are at most this (a double holds them)
local CLASS_LEN = 37

local function score_class(s)
  return score_cell(s) .. hex_of(score_ms(s)) .. string.format('%016.0f', TOKENS_TOP - s.tok)
end

-- What an entry of sc_members or sc_classes holds: estimate, enqueued_at, member.
local function entry_tokens(entry)
  return TOKENS_TOP - tonumber(string.sub(entry, 22, 37))
end

local function entry_at(entry)
  return tonumber(string.sub(entry, 38, 53))
end

local function entry_member(entry)
  return string.sub(entry, 54)
end

-- The sc_heads entry of a sc_classes entry: its cell and bucket, its head, its time and
-- estimate.
local function head_entry(entry)
  return string.sub(entry, 1, 5) .. bucket_of(string.sub(entry, 6, 21)) .. string.sub(entry, CLASS_LEN + 1)
    .. string.sub(entry, 6, CLASS_LEN)
end

local function score_age_key(member, s)
  return string.format('%016.0f', s.at) .. member
end

local CELL_MARK = '|' -- after a cell's oldest in its sc_cells entry (character 37): its steps follow
local STEP_LEN = BUCKET_LEN + 16 -- a step: a bucket, its band's oldest enqueued_at

local SCORE_KEYS = {'sc_members', 'sc_ages', 'sc_classes', 'sc_heads', 'sc_cells'}

-- Drops the index of a queue whose sc_cells has an earlier layout (a hash, or entries without
-- bands): the next dispatch finds the queue unscored and has it filled again (score_fill.lua).
-- The rest of this script keeps the new index only if a process of the score policy has
-- announced itself ('scoring': every script keeps it from then, so what is written is whole
-- once a fill ends); else nothing writes it until one does, as the entries of messages that
-- later scripts take would stay behind (queue_common.lua, score_kept), and a fill on top of
-- them would hand those out again.
local function score_index_drop(q)
  -- Bounded: the five keys of the index.
  for _, name in ipairs(SCORE_KEYS) do
    redis.call('DEL', q[name])
  end
  redis.call('HDEL', q.meta, 'scored')
  q.score_kept = redis.call('HGET', q.meta, 'scoring') == '1'
end

-- Whether the index has an earlier layout (its sc_cells a hash, which ZRANGE refuses, or its
-- entries without bands or with a band per exact time).
local function score_layout_earlier(q)
  local first = redis.pcall('ZRANGE', q.sc_cells, 0, 0)
  if first.err ~= nil then
    return true
  end
  return first[1] ~= nil and string.sub(first[1], 37, 37) ~= CELL_MARK
end

-- The sc_cells entry of `cell` (nil when it has no visible member), and false when the index
-- has an earlier layout (dropped then).
local function cell_entry(q, cell)
  local found = redis.pcall('ZRANGEBYLEX', q.sc_cells, '[' .. cell, '[' .. cell .. '\255', 'LIMIT', 0, 1)
  if found.err ~= nil or (found[1] ~= nil and string.sub(found[1], 37, 37) ~= CELL_MARK) then
    score_index_drop(q)
    return false
  end
  return found[1]
end

-- The steps of the sc_cells entry of a non-empty `cell`, from its bands' sc_ages entries oldest
-- first: each band whose bucket is better than every older band's (at one enqueued_at the
-- better bucket sorts first, so the other adds nothing).
local function cell_steps(q, cell)
  local bands = redis.call('ZRANGEBYLEX', q.sc_ages, '[~' .. cell, '[~' .. cell .. '\255')
  local steps, record = {}, nil
  -- Bounded by the cell's bands: at most its buckets (the times are clamped to 1 s .. 30 s).
  for _, band in ipairs(bands) do
    -- ~<cell><enqueued_at: 16><bucket: 5>
    local bucket = string.sub(band, 23, 27)
    if record == nil or bucket < record then
      record = bucket
      steps[#steps + 1] = bucket .. string.sub(band, 7, 22)
    end
  end
  return table.concat(steps)
end

-- The enqueued_at of the oldest member of the band `band` (<cell><bucket>), nil when it has none.
local function band_oldest(q, band)
  local first = redis.call('ZRANGEBYLEX', q.sc_heads, '[' .. band, '[' .. band .. '\255', 'LIMIT', 0, 1)[1]
  return first and string.sub(first, 11, 26)
end

-- Moves the sc_ages entry of band `band` from enqueued_at `was` to `now` (nil: none).
local function band_moved(q, band, was, now)
  if was == now then
    return
  end
  local cell, bucket = string.sub(band, 1, 5), string.sub(band, 6, 10)
  if was ~= nil then
    redis.call('ZREM', q.sc_ages, '~' .. cell .. was .. bucket)
  end
  if now ~= nil then
    redis.call('ZADD', q.sc_ages, 0, '~' .. cell .. now .. bucket)
  end
end

local function score_index_add(q, member, s)
  if s.ten == nil then
    return -- stored before the index: score_fill.lua adds it
  end
  local class, age = score_class(s), score_age_key(member, s)
  if redis.call('ZADD', q.sc_members, 0, class .. age) == 0 then
    return -- indexed already
  end
  local cell = string.sub(class, 1, 5)
  local bucket, at = bucket_of(string.sub(class, 6, 21)), string.sub(age, 1, 16)
  redis.call('ZADD', q.sc_ages, 0, cell .. age)
  local entry = redis.call('ZRANGEBYLEX', q.sc_classes, '[' .. class, '[' .. class .. '\255', 'LIMIT', 0, 1)[1]
  local moved = false -- whether its band's oldest changed (the cell's steps may have)
  if entry == nil or age < string.sub(entry, CLASS_LEN + 1) then
    local band = cell .. bucket
    local was = band_oldest(q, band)
    if entry ~= nil then
      redis.call('ZREM', q.sc_classes, entry)
      redis.call('ZREM', q.sc_heads, head_entry(entry))
    end
    redis.call('ZADD', q.sc_classes, 0, class .. age) -- its new head
    redis.call('ZADD', q.sc_heads, 0, head_entry(class .. age))
    if was == nil or at < was then
      band_moved(q, band, was, at) -- the band's oldest member now
      moved = true
    end
  end
  local summary = cell_entry(q, cell)
  if summary == nil then
    if not score_layout_earlier(q) then
      redis.call('ZADD', q.sc_cells, 0, cell .. age .. CELL_MARK .. bucket .. at)
    else
      score_index_drop(q)
    end
    return
  elseif not summary then
    return
  end
  local oldest = string.sub(summary, 6, 36)
  if age < oldest then
    oldest = age
  end
  local kept = cell .. oldest .. CELL_MARK .. (moved and cell_steps(q, cell) or string.sub(summary, 38))
  if kept ~= summary then
    redis.call('ZREM', q.sc_cells, summary)
    redis.call('ZADD', q.sc_cells, 0, kept)
  end
end

local function score_index_remove(q, member, s)
  if s.ten == nil then
    return
  end
  local class, age = score_class(s), score_age_key(member, s)
  if redis.call('ZREM', q.sc_members, class .. age) == 0 then
    return -- not indexed
  end
  local cell = string.sub(class, 1, 5)
  redis.call('ZREM', q.sc_ages, cell .. age)
  local bucket = bucket_of(string.sub(class, 6, 21))
  local band, at = cell .. bucket, string.sub(age, 1, 16)
  local moved = false -- whether its band's oldest changed (the cell's steps may have)
  if redis.call('ZREM', q.sc_classes, class .. age) == 1 then
    -- It was the class's head: the next oldest takes its place, if any.
    redis.call('ZREM', q.sc_heads, head_entry(class .. age))
    local next = redis.call('ZRANGEBYLEX', q.sc_members, '[' .. class, '[' .. class .. '\255', 'LIMIT', 0, 1)[1]
    if next ~= nil then
      redis.call('ZADD', q.sc_classes, 0, next)
      redis.call('ZADD', q.sc_heads, 0, head_entry(next))
    end
    -- It may have been its band's oldest member (nil now: the band emptied).
    local band_now = band_oldest(q, band)
    if band_now == nil or at < band_now then
      band_moved(q, band, at, band_now)
      moved = true
    end
  end
  local summary = cell_entry(q, cell)
  if not summary then
    return
  end
  local oldest = string.sub(summary, 6, 36)
  if oldest == age then
    local next_oldest = redis.call('ZRANGEBYLEX', q.sc_ages, '[' .. cell, '[' .. cell .. '\255', 'LIMIT', 0, 1)[1]
    if next_oldest == nil then
      redis.call('ZREM', q.sc_cells, summary) -- its last member
      return
    end
    oldest = string.sub(next_oldest, 6)
  end
  local kept = cell .. oldest .. CELL_MARK .. (moved and cell_steps(q, cell) or string.sub(summary, 38))
  if kept ~= summary then
    redis.call('ZREM', q.sc_cells, summary)
    redis.call('ZADD', q.sc_cells, 0, kept)
  end
end
