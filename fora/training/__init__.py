"""A training run: data, batching, the built-in tasks, the method table, the loop, checkpoints."""
