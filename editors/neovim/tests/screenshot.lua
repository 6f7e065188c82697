-- Headless screenshot of ghost text: open a Python file, ask kodkod for a completion at the cursor,
-- and dump the screen grid (characters and highlight ids) to $SHOT_OUT as JSON. See README, Editors.
vim.cmd("runtime plugin/kodkod.lua")
local kodkod = require("kodkod")
kodkod.setup({ endpoint = os.getenv("KODKOD_TEST_URL"), temperature = 0, debounce_ms = 10 })
vim.o.columns, vim.o.lines = 72, 14
vim.cmd("syntax on")
vim.bo.filetype = "python"
local lines = {
  "from collections import Counter",
  "",
  "",
  "def word_counts(text: str) -> dict[str, int]:",
  '    """How often each word occurs in text."""',
  "    counts = {}",
  "    for word in text.split():",
  "        ",
  "    return counts",
  "",
  "",
  'print(word_counts("to be or not to be"))',
}
vim.api.nvim_buf_set_lines(0, 0, -1, false, lines)
vim.api.nvim_win_set_cursor(0, { 8, 8 })
vim.cmd("startinsert!")
kodkod.request()
local ok = vim.wait(120000, function() return kodkod.visible() end, 100)
vim.cmd("redraw!")
local rows = {}
for r = 1, vim.o.lines - 1 do
  local chars, ghost = {}, {}
  for c = 1, vim.o.columns do
    chars[#chars + 1] = vim.fn.screenstring(r, c)
    local id = vim.fn.screenattr(r, c)
    ghost[#ghost + 1] = id
  end
  rows[#rows + 1] = { text = table.concat(chars), attrs = ghost }
end
local f = io.open(os.getenv("SHOT_OUT"), "w")
f:write(vim.fn.json_encode({ ok = ok, rows = rows, cursor = { 8, 8 } }))
f:close()
vim.cmd("qa!")
