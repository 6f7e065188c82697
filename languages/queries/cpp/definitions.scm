(function_definition declarator: (function_declarator declarator: (identifier) @name)) @definition
(function_definition declarator: (function_declarator declarator: (qualified_identifier name: (identifier) @name))) @definition
(function_definition declarator: (function_declarator declarator: (field_identifier) @name)) @definition
(class_specifier name: (type_identifier) @name) @definition
(struct_specifier name: (type_identifier) @name) @definition
