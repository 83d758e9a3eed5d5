"""The N models: checkpoints loaded into one architecture, the embedded zoo, and the data splits."""
