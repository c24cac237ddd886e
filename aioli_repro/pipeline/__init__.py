"""Method pipelines: stages keyed by config hash, shared where identical, never redone once finished."""
