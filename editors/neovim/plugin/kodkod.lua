-- kodkod: inline code completion from a kodkod (Tabby-compatible) server.
-- Loading the plugin only defines :Kodkod; require("kodkod").setup{} turns it on.
if vim.g.loaded_kodkod then
  return
end
vim.g.loaded_kodkod = true

vim.api.nvim_create_user_command("Kodkod", function(cmd)
  require("kodkod").command(cmd.fargs)
end, {
  nargs = "*",
  complete = function()
    return { "status", "enable", "disable", "trigger" }
  end,
})
