(call method: (identifier) @_m (#match? @_m "^(require|require_relative|load)$")) @import
