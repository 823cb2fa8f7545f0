"""Training: mesh and sharding, optimizer and state, checkpoints, the train loop."""
