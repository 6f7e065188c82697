-- kodkod for Neovim: ghost text from a kodkod (Tabby-compatible) server.
-- Works on Neovim 0.7 and newer: where a newer API exists (vim.system, inline virtual
-- text) it is used, else the 0.7 one (jobstart, overlay virtual text).
local M = {}

local uv = vim.uv or vim.loop
local ns = vim.api.nvim_create_namespace("kodkod")
local has_inline = vim.fn.has("nvim-0.10") == 1

M.config = {
  endpoint = nil, -- nil: $KODKOD_ENDPOINT, else http://127.0.0.1:8080
  token = nil, -- nil: $KODKOD_TOKEN
  auto_trigger = true, -- false: only on the trigger key
  debounce_ms = 150,
  disabled_filetypes = {},
  max_lines = 20, -- lines of prefix and of suffix sent, as Tabby's clients do
  max_tokens = nil, -- nil: the server's default
  temperature = nil,
  timeout_s = 30,
  keymaps = {
    accept = "<Tab>",
    accept_line = "<C-Down>",
    dismiss = "<C-]>",
    trigger = "<M-\\>",
  },
}

-- What the plugin is doing, for :Kodkod status and the tests.
M.state = {
  status = "ready", -- ready | loading | error | disabled
  message = nil, -- the error, when status is error
  latency_ms = nil,
  suggestion = nil, -- { id, text, buf, row, col, tick }
  stats = { requests = 0, killed = 0, shown = 0, accepted = 0 },
}

local job -- the request in flight: { kill = function() }
local seq = 0 -- request number: an answer to an older one is dropped
local timer

local function endpoint()
  local e = M.config.endpoint
  if e == nil or e == "" then
    e = vim.env.KODKOD_ENDPOINT
  end
  if e == nil or e == "" then
    e = "http://127.0.0.1:8080"
  end
  return (e:gsub("/+$", ""))
end

local function token()
  local t = M.config.token
  if t == nil or t == "" then
    t = vim.env.KODKOD_TOKEN
  end
  if t == "" then
    return nil
  end
  return t
end

local function encode(v)
  return vim.json and vim.json.encode(v) or vim.fn.json_encode(v)
end

local function decode(s)
  return vim.json and vim.json.decode(s) or vim.fn.json_decode(s)
end

local function set_status(status, message)
  M.state.status = status
  M.state.message = message
end

-- Runs curl with `body` on stdin; on_done(http_status, body_text, curl_error) runs on
-- the main loop. Returns a handle whose kill() ends curl (the connection closes, and
-- the server stops generating).
local function curl(path, body, on_done)
  local args = {
    "curl", "-sS", "-X", "POST", endpoint() .. path,
    "-H", "Content-Type: application/json",
    "--data-binary", "@-",
    "-m", tostring(M.config.timeout_s),
    "-w", "\n%{http_code}",
  }
  local tok = token()
  if tok then
    table.insert(args, "-H")
    table.insert(args, "Authorization: Bearer " .. tok)
  end
  local function finish(code, out, err)
    local status = tonumber(out:match("(%d%d%d)%s*$")) or 0
    local text = out:gsub("\n?%d%d%d%s*$", "")
    on_done(status, text, code ~= 0 and (err ~= "" and err or ("curl exited " .. code)) or nil)
  end
  if vim.system then
    local ok, obj = pcall(vim.system, args, { stdin = body, text = true }, function(r)
      vim.schedule(function()
        finish(r.code, r.stdout or "", (r.stderr or ""):gsub("%s+$", ""))
      end)
    end)
    if not ok then
      vim.schedule(function() on_done(0, "", tostring(obj)) end)
      return { kill = function() end }
    end
    return { kill = function() obj:kill(9) end }
  end
  local out, err = {}, {}
  local id = vim.fn.jobstart(args, {
    stdout_buffered = true,
    stderr_buffered = true,
    on_stdout = function(_, d) out = d end,
    on_stderr = function(_, d) err = d end,
    on_exit = function(_, code)
      finish(code, table.concat(out, "\n"), (table.concat(err, "\n"):gsub("%s+$", "")))
    end,
  })
  if id <= 0 then
    vim.schedule(function() on_done(0, "", "curl could not be started") end)
    return { kill = function() end }
  end
  vim.fn.chansend(id, body)
  vim.fn.chanclose(id, "stdin")
  return { kill = function() vim.fn.jobstop(id) end }
end

-- Why a request failed, in words the user can act on.
local function explain(status, text, err)
  if err then
    return "kodkod server unreachable at " .. endpoint() .. " (" .. err .. ")"
  end
  if status == 401 then
    if token() then
      return "kodkod server at " .. endpoint() .. " rejected the token (401): set another in setup{token=...} or KODKOD_TOKEN"
    end
    return "kodkod server at " .. endpoint() .. " needs a token (401): set it in setup{token=...} or KODKOD_TOKEN"
  end
  return "kodkod server at " .. endpoint() .. " answered " .. status .. " " .. text:sub(1, 200)
end

function M.clear()
  local s = M.state.suggestion
  if s and vim.api.nvim_buf_is_valid(s.buf) then
    vim.api.nvim_buf_clear_namespace(s.buf, ns, 0, -1)
  end
  M.state.suggestion = nil
end

-- Stops the pending debounce and the request in flight.
function M.cancel()
  if timer then
    timer:stop()
  end
  seq = seq + 1
  if job then
    job.kill()
    job = nil
    M.state.stats.killed = M.state.stats.killed + 1
    if M.state.status == "loading" then
      set_status("ready")
    end
  end
end

local function event(kind, id, line)
  -- acceptance statistics: fire and forget
  curl("/v1/events" .. (line and "?select_kind=line" or ""),
    encode({ type = kind, completion_id = id, choice_index = 0 }), function() end)
end

local function show(s)
  M.clear()
  local lines = vim.split(s.text, "\n", { plain = true })
  local opts = {
    virt_text = { { lines[1], "KodkodSuggestion" } },
    virt_text_pos = has_inline and "inline" or "overlay",
    hl_mode = "combine",
  }
  if #lines > 1 then
    local extra = {}
    for i = 2, #lines do
      extra[#extra + 1] = { { lines[i], "KodkodSuggestion" } }
    end
    opts.virt_lines = extra
  end
  s.mark = vim.api.nvim_buf_set_extmark(s.buf, ns, s.row, s.col, opts)
  M.state.suggestion = s
  M.state.stats.shown = M.state.stats.shown + 1
  event("view", s.id)
end

-- The request body: up to max_lines lines each side of the cursor.
function M.build_request(buf, row, col)
  local n = M.config.max_lines
  local first = math.max(0, row - n + 1)
  local before = vim.api.nvim_buf_get_lines(buf, first, row + 1, false)
  local after = vim.api.nvim_buf_get_lines(buf, row, row + n + 1, false)
  local line = before[#before] or ""
  before[#before] = line:sub(1, col)
  after[1] = line:sub(col + 1)
  local body = {
    language = vim.bo[buf].filetype ~= "" and vim.bo[buf].filetype or nil,
    segments = {
      prefix = table.concat(before, "\n"),
      suffix = table.concat(after, "\n"),
      filepath = vim.fn.fnamemodify(vim.api.nvim_buf_get_name(buf), ":."),
    },
    max_tokens = M.config.max_tokens,
    temperature = M.config.temperature,
  }
  if body.segments.filepath == "" then
    body.segments.filepath = nil
  end
  return body
end

-- Asks for a suggestion at the cursor of the current window now.
function M.request()
  M.cancel()
  M.clear()
  local buf = vim.api.nvim_get_current_buf()
  if vim.tbl_contains(M.config.disabled_filetypes, vim.bo[buf].filetype) then
    return
  end
  local cursor = vim.api.nvim_win_get_cursor(0)
  local row, col = cursor[1] - 1, cursor[2]
  local tick = vim.api.nvim_buf_get_changedtick(buf)
  local mine = seq
  local t0 = uv.hrtime()
  set_status("loading")
  M.state.stats.requests = M.state.stats.requests + 1
  job = curl("/v1/completions", encode(M.build_request(buf, row, col)), function(status, text, err)
    if mine ~= seq then
      return -- superseded: a newer request or a keystroke came first
    end
    job = nil
    if err or status ~= 200 then
      set_status("error", explain(status, text, err))
      return
    end
    local ok, res = pcall(decode, text)
    if not ok or type(res) ~= "table" or type(res.choices) ~= "table" or not res.choices[1] then
      set_status("error", "kodkod: an answer that is not a completion: " .. text:sub(1, 200))
      return
    end
    set_status("ready")
    M.state.latency_ms = math.floor((uv.hrtime() - t0) / 1e6)
    local completion = res.choices[1].text
    -- shown only where it was asked for: same buffer, text and cursor
    if completion == "" or completion == vim.NIL or not vim.api.nvim_buf_is_valid(buf)
      or vim.api.nvim_buf_get_changedtick(buf) ~= tick or vim.api.nvim_get_current_buf() ~= buf then
      return
    end
    local now = vim.api.nvim_win_get_cursor(0)
    if now[1] - 1 ~= row or now[2] ~= col then
      return
    end
    show({ id = res.id, text = completion, buf = buf, row = row, col = col, tick = tick })
  end)
end

M._show = show -- for the tests

-- After each change in insert mode: drop what is shown, abort the request in flight,
-- and ask again once the user pauses.
function M.on_change()
  local s = M.state.suggestion
  if s and s.buf == vim.api.nvim_get_current_buf() and vim.api.nvim_buf_get_changedtick(s.buf) == s.tick then
    return -- our own change (accept line), with the rest of the suggestion on offer
  end
  M.cancel()
  M.clear()
  if not M.config.auto_trigger or M.state.status == "disabled" then
    return
  end
  timer = timer or uv.new_timer()
  timer:start(M.config.debounce_ms, 0, vim.schedule_wrap(function()
    if vim.fn.mode():sub(1, 1) == "i" then
      M.request()
    end
  end))
end

-- Whether a suggestion is shown at the cursor now.
function M.visible()
  local s = M.state.suggestion
  if not s or s.buf ~= vim.api.nvim_get_current_buf() or vim.api.nvim_buf_get_changedtick(s.buf) ~= s.tick then
    return false
  end
  local c = vim.api.nvim_win_get_cursor(0)
  return c[1] - 1 == s.row and c[2] == s.col
end

-- Inserts the suggestion (or its first line, with `line`) at the cursor.
function M.accept(line)
  if not M.visible() then
    return false
  end
  local s = M.state.suggestion
  local text = s.text
  if line then
    local first, rest = text:match("^(.-\n)(.*)$")
    if first and first ~= "\n" then
      text = first:sub(1, -2) -- the line without its newline: the next accept goes on
    elseif first then
      text = "\n" .. (rest:match("^([^\n]*)") or "")
    end
  end
  local lines = vim.split(text, "\n", { plain = true })
  M.clear()
  vim.api.nvim_buf_set_text(s.buf, s.row, s.col, s.row, s.col, lines)
  local row = s.row + #lines - 1
  local col = (#lines == 1 and s.col or 0) + #lines[#lines]
  vim.api.nvim_win_set_cursor(0, { row + 1, col })
  M.state.stats.accepted = M.state.stats.accepted + 1
  event("select", s.id, line)
  if line and #text < #s.text then
    -- the rest stays on offer at the new cursor
    show({ id = s.id, text = s.text:sub(#text + 1), buf = s.buf, row = row, col = col,
      tick = vim.api.nvim_buf_get_changedtick(s.buf) })
  end
  return true
end

function M.dismiss()
  if not M.state.suggestion then
    return false
  end
  event("dismiss", M.state.suggestion.id)
  M.clear()
  return true
end

-- A GET of /v1/health; on_done(ok, message).
function M.health(on_done)
  local args = { "curl", "-sS", "-m", "5", "-w", "\n%{http_code}", endpoint() .. "/v1/health" }
  local tok = token()
  if tok then
    vim.list_extend(args, { "-H", "Authorization: Bearer " .. tok })
  end
  local out = vim.fn.system(args)
  local status = tonumber(out:match("(%d%d%d)%s*$")) or 0
  local err = vim.v.shell_error ~= 0 and out:gsub("%s+$", "") or nil
  if err or status ~= 200 then
    set_status("error", explain(status, out:gsub("\n?%d%d%d%s*$", ""), err))
  elseif M.state.status == "error" then
    set_status("ready")
  end
  if on_done then
    on_done(M.state.status ~= "error", M.state.message)
  end
end

function M.status_line()
  local s = M.state
  local text = "kodkod " .. s.status .. " at " .. endpoint()
  if s.status == "error" then
    text = "kodkod: " .. (s.message or "error")
  elseif s.latency_ms then
    text = text .. ", last completion " .. s.latency_ms .. " ms"
  end
  return text
end

function M.command(args)
  local sub = args[1] or "status"
  if sub == "status" then
    M.health()
    vim.notify(M.status_line(), M.state.status == "error" and vim.log.levels.ERROR or vim.log.levels.INFO)
  elseif sub == "disable" then
    M.cancel()
    M.clear()
    set_status("disabled")
  elseif sub == "enable" then
    set_status("ready")
  elseif sub == "trigger" then
    M.request()
  else
    vim.notify("kodkod: unknown subcommand " .. sub, vim.log.levels.ERROR)
  end
end

-- An insert-mode key that does our job when a suggestion is shown and otherwise
-- whatever the key did before: the user's own mapping, else the key itself.
local function map(lhs, action)
  if not lhs or lhs == "" then
    return
  end
  local previous = vim.fn.maparg(lhs, "i", false, true)
  vim.keymap.set("i", lhs, function()
    if action() then
      return
    end
    if previous and previous.callback then
      local r = previous.callback()
      if previous.expr == 1 and type(r) == "string" then
        vim.api.nvim_feedkeys(vim.api.nvim_replace_termcodes(r, true, false, true), "ni", false)
      end
    elseif previous and previous.rhs and previous.rhs ~= "" then
      local keys = previous.expr == 1 and vim.api.nvim_eval(previous.rhs) or previous.rhs
      vim.api.nvim_feedkeys(vim.api.nvim_replace_termcodes(keys, true, false, true),
        previous.noremap == 1 and "ni" or "mi", false)
    else
      -- "i": before whatever is already typed ahead, where the key itself was
      vim.api.nvim_feedkeys(vim.api.nvim_replace_termcodes(lhs, true, false, true), "ni", false)
    end
  end, { desc = "kodkod" })
end

function M.setup(opts)
  M.config = vim.tbl_deep_extend("force", M.config, opts or {})
  local group = vim.api.nvim_create_augroup("kodkod", { clear = true })
  vim.api.nvim_create_autocmd("TextChangedI", { group = group, callback = M.on_change })
  vim.api.nvim_create_autocmd({ "InsertLeave", "BufLeave" }, {
    group = group,
    callback = function()
      M.cancel()
      M.clear()
    end,
  })
  local k = M.config.keymaps
  map(k.accept, function() return M.accept(false) end)
  map(k.accept_line, function() return M.accept(true) end)
  map(k.dismiss, M.dismiss)
  map(k.trigger, function()
    M.request()
    return true
  end)
  vim.api.nvim_set_hl(0, "KodkodSuggestion", { link = "Comment", default = true })
end

return M
