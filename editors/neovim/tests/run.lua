-- Headless tests of the plugin against a live kodkod server:
--   KODKOD_TEST_URL=http://127.0.0.1:PORT KODKOD_TEST_TOKEN=T \
--   nvim --headless -u NONE -i NONE -n --cmd "set rtp^=editors/neovim" -c "luafile editors/neovim/tests/run.lua"
-- Prints one line per test, then "N passed, N failed", and exits non-zero on a failure.
local url, tok = os.getenv("KODKOD_TEST_URL"), os.getenv("KODKOD_TEST_TOKEN")
-- -u NONE loads no plugin scripts: load ours as a plugin manager would
vim.cmd("runtime plugin/kodkod.lua")
local kodkod = require("kodkod")
kodkod.setup({ endpoint = url, token = tok, temperature = 0, debounce_ms = 30 })

local passed, failed = 0, 0
local function out(line)
  io.stdout:write(line .. "\n")
end
local function check(cond, msg)
  if not cond then
    error(msg or "check failed", 2)
  end
end
local function eq(a, b, what)
  if not vim.deep_equal(a, b) then
    error((what or "") .. ": expected " .. vim.inspect(b) .. ", got " .. vim.inspect(a), 2)
  end
end
local function test(name, f)
  local ok, err = pcall(f)
  kodkod.cancel()
  kodkod.clear()
  if ok then
    passed = passed + 1
    out("ok - " .. name)
  else
    failed = failed + 1
    out("not ok - " .. name .. ": " .. tostring(err))
  end
end

-- A Prometheus counter of the server (0 when the series does not exist yet).
local function metric(series)
  for _, line in ipairs(vim.fn.systemlist({ "curl", "-sS", url .. "/metrics" })) do
    if line:sub(1, #series + 1) == series .. " " then
      return tonumber(line:sub(#series + 2))
    end
  end
  return 0
end
local CANCELLED = 'kodkod_cancellations_total{reason="disconnected"}'

-- the cursor goes before the "x": in normal mode it cannot stand past a line's end
local LINES = { "def fib(n):", "    x", "print(fib(3))" }
local function fresh()
  vim.cmd("enew!")
  vim.bo.filetype = "python"
  vim.api.nvim_buf_set_lines(0, 0, -1, false, LINES)
  vim.api.nvim_win_set_cursor(0, { 2, 4 })
  return vim.api.nvim_get_current_buf()
end

-- A fresh buffer with a suggestion shown at the cursor.
local function shown()
  local buf = fresh()
  kodkod.request()
  check(vim.wait(10000, kodkod.visible, 10), "no suggestion: " .. kodkod.status_line())
  return buf
end

test("ghost text appears at the cursor", function()
  local buf = shown()
  local s = kodkod.state.suggestion
  check(#s.text > 0)
  local marks = vim.api.nvim_buf_get_extmarks(buf, vim.api.nvim_create_namespace("kodkod"), 0, -1, { details = true })
  eq(#marks, 1, "extmarks")
  local _, row, col, d = unpack(marks[1])
  eq({ row, col }, { 1, 4 }, "extmark position")
  eq(d.virt_text[1][1], vim.split(s.text, "\n", { plain = true })[1], "ghost text")
  eq(d.virt_text_pos, vim.fn.has("nvim-0.10") == 1 and "inline" or "overlay", "virt_text_pos")
  eq(vim.api.nvim_buf_get_lines(buf, 0, -1, false), LINES, "buffer untouched by ghost text")
  check(kodkod.status_line():match("^kodkod ready at .*, last completion %d+ ms$"), kodkod.status_line())
end)

test("accepting inserts exactly the suggestion and leaves the rest of the buffer", function()
  local buf = shown()
  local text = kodkod.state.suggestion.text
  local before = table.concat(LINES, "\n")
  local offset = #LINES[1] + 1 + 4
  check(kodkod.accept(), "accept")
  local want = before:sub(1, offset) .. text .. before:sub(offset + 1)
  check(want:find("    " .. text .. "x\nprint", 1, true))
  eq(table.concat(vim.api.nvim_buf_get_lines(buf, 0, -1, false), "\n"), want, "buffer after accept")
  local inserted = vim.split(text, "\n", { plain = true })
  local row = 2 + #inserted - 1
  local col = (#inserted == 1 and 4 or 0) + #inserted[#inserted]
  eq(vim.api.nvim_win_get_cursor(0), { row, col }, "cursor after accept")
  check(not kodkod.visible(), "nothing shown after accept")
  check(not kodkod.accept(), "a second accept does nothing")
end)

test("typing aborts the running request and the server cancels it", function()
  local buf = fresh()
  -- nothing after the cursor: the tiny model then writes all of max_tokens, about a
  -- second of decoding (the server must allow 500), still running when we type
  vim.o.virtualedit = "onemore"
  vim.api.nvim_buf_set_lines(buf, 0, -1, false, { "def fib(n):", "    " })
  vim.api.nvim_win_set_cursor(0, { 2, 4 })
  local c0 = metric(CANCELLED)
  kodkod.config.max_tokens = 500
  kodkod.request()
  kodkod.config.max_tokens = nil
  vim.wait(100)
  eq(kodkod.state.status, "loading", "a request in flight")
  -- a keystroke: the buffer changes and TextChangedI fires
  vim.api.nvim_buf_set_text(buf, 1, 4, 1, 4, { "r" })
  vim.api.nvim_win_set_cursor(0, { 2, 5 })
  local killed = kodkod.state.stats.killed
  vim.cmd("doautocmd TextChangedI")
  eq(kodkod.state.stats.killed, killed + 1, "the request in flight was killed")
  check(vim.wait(5000, function() return metric(CANCELLED) >= c0 + 1 end, 50), "the server saw no cancellation")
  vim.wait(1500) -- long enough for the killed request's answer, had it lived
  check(not kodkod.visible() and kodkod.state.suggestion == nil, "no stale suggestion")
end)

test("the accept key falls back to the key itself when nothing is shown", function()
  local buf = fresh()
  vim.api.nvim_feedkeys(vim.api.nvim_replace_termcodes("ggA<Tab>x<Esc>", true, false, true), "x", false)
  eq(vim.api.nvim_buf_get_lines(buf, 0, 1, false)[1], "def fib(n):\tx", "Tab typed as a Tab")
end)

test("the accept key accepts a shown suggestion in insert mode", function()
  local buf = shown()
  local text = kodkod.state.suggestion.text
  -- "i" enters insert mode before the x, where the suggestion is; Tab accepts it
  vim.api.nvim_feedkeys(vim.api.nvim_replace_termcodes("i<Tab><Esc>", true, false, true), "x", false)
  local want = "def fib(n):\n    " .. text .. "x\nprint(fib(3))"
  eq(table.concat(vim.api.nvim_buf_get_lines(buf, 0, -1, false), "\n"), want, "buffer after Tab")
end)

test("accept line inserts one line at a time and keeps the rest on offer", function()
  local buf = fresh()
  local tick = vim.api.nvim_buf_get_changedtick(buf)
  kodkod._show({ id = "cmpl-00000000-0000-4000-8000-000000000000", text = "ab\ncd", buf = buf, row = 1, col = 4, tick = tick })
  check(kodkod.accept(true), "accept line")
  eq(vim.api.nvim_buf_get_lines(buf, 0, -1, false), { "def fib(n):", "    abx", "print(fib(3))" }, "first line")
  eq(vim.api.nvim_win_get_cursor(0), { 2, 6 }, "cursor")
  vim.cmd("doautocmd TextChangedI") -- our own change does not drop the rest
  check(kodkod.visible(), "the rest is shown")
  eq(kodkod.state.suggestion.text, "\ncd")
  check(kodkod.accept(true), "accept the next line")
  eq(vim.api.nvim_buf_get_lines(buf, 0, -1, false), { "def fib(n):", "    ab", "cdx", "print(fib(3))" }, "second line")
  check(not kodkod.visible(), "all accepted")
end)

test("a rejected token and an unreachable server are reported", function()
  fresh()
  kodkod.config.token = "wrong"
  kodkod.request()
  check(vim.wait(5000, function() return kodkod.state.status == "error" end, 10), "no error")
  check(kodkod.state.message:find("rejected the token (401)", 1, true), kodkod.state.message)
  kodkod.config.token = tok
  kodkod.health()
  eq(kodkod.state.status, "ready", "health with the right token")
  kodkod.config.endpoint = "http://127.0.0.1:1"
  kodkod.request()
  check(vim.wait(5000, function() return kodkod.state.status == "error" end, 10), "no error")
  check(kodkod.state.message:find("unreachable at http://127.0.0.1:1", 1, true), kodkod.state.message)
  kodkod.config.endpoint = url
end)

test(":Kodkod status, disable and enable; disabled filetypes", function()
  local notes = {}
  local notify = vim.notify
  vim.notify = function(msg, level) notes[#notes + 1] = { msg, level } end
  vim.cmd("Kodkod status")
  vim.notify = notify
  check(notes[1][1]:match("^kodkod ready at " .. vim.pesc(url)), notes[1][1])
  eq(notes[1][2], vim.log.levels.INFO, "level")
  local buf = fresh()
  vim.cmd("Kodkod disable")
  vim.cmd("doautocmd TextChangedI")
  vim.wait(200)
  eq(kodkod.state.status, "disabled", "disabled")
  check(kodkod.state.suggestion == nil, "nothing shown while disabled")
  vim.cmd("Kodkod enable")
  kodkod.config.disabled_filetypes = { "python" }
  local n = kodkod.state.stats.requests
  kodkod.request()
  eq(kodkod.state.stats.requests, n, "no request for a disabled filetype")
  kodkod.config.disabled_filetypes = {}
  eq(vim.api.nvim_buf_get_lines(buf, 0, -1, false), LINES, "buffer untouched")
end)

test("endpoint and token from the environment when setup gives none", function()
  local saved = { kodkod.config.endpoint, kodkod.config.token }
  kodkod.config.endpoint, kodkod.config.token = nil, nil
  vim.env.KODKOD_ENDPOINT, vim.env.KODKOD_TOKEN = url .. "/", tok
  shown()
  kodkod.config.endpoint, kodkod.config.token = saved[1], saved[2]
end)

out(string.format("%d passed, %d failed", passed, failed))
vim.cmd(failed == 0 and "qall!" or "cquit 1")
