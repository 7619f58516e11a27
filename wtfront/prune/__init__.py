"""Pruning a live model: masks (fake pruning), physical removal with its checks and IR surgery, module metadata
sync, the transactional snapshot, pruned checkpoints and the hand-over to `torch.nn.utils.prune`."""
