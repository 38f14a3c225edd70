"""Model families: one module each (ours, Wan), and the registry that says which family a folder is."""
