(variable_declaration (assignment_statement (expression_list value: (function_call name: (identifier) @_r (#eq? @_r "require"))))) @import
