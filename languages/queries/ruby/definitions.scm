(method name: (_) @name) @definition
(singleton_method name: (_) @name) @definition
(class name: (constant) @name) @definition
(module name: (constant) @name) @definition
