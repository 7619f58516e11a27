"""Training with wt: the tracker and regularizers, channel decay, pruning schedules and the pruning controller."""
