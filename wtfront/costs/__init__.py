"""The cost model of a traced structure: MACs of every costed op (`macs`) and bit widths per op (`bits`)."""
