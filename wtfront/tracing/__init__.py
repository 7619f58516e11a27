"""Tracing: an `nn.Module` lowered to the wt IR through Torch-Pruning's dependency graph (`wtfront.trace`).

`entry` runs the phases under a wall-clock `budget`; `graph` is Torch-Pruning's graph with wt's fixes (`shuffle`,
`rotary`), `groups` walks its pruning groups (`balance` closes the units of walks through a shuffle), `slicers` and
`lowering` turn them into unit groups, `coverage`
marks the groups whose units are not closed, `attention` discovers heads and `units` makes them the IR's units.
"""
