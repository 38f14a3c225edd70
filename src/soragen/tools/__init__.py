"""Tools around the model: the shapes world and its judge, soragen eval, inspect-patches, a tiny random Wan pipeline."""
