(function_definition name: (identifier) @name) @definition
(class_definition name: (identifier) @name) @definition
