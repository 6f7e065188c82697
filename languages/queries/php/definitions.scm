(function_definition name: (name) @name) @definition
(method_declaration name: (name) @name) @definition
(class_declaration name: (name) @name) @definition
