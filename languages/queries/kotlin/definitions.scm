(function_declaration name: (identifier) @name) @definition
(class_declaration name: (identifier) @name) @definition
