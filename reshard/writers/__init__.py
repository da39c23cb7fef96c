"""Output formats: one writer per shard format behind one interface."""
