"""train: training: a session set up and agreed, the step on the feed's batches, the
loop with its guards and checkpoints, what a run reports, resuming, phase timers,
progress within an epoch; and the trained model used: evaluate and predict."""
