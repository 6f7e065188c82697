(command name: (command_name (word) @_c (#match? @_c "^(source|\\.)$"))) @import
