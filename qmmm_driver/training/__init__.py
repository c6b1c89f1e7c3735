"""Training on labelled QM/MM frames: batching, statistics, loss, the training loop."""
