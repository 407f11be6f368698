"""The device mesh and the one table of rules from logical axis names to mesh axes."""
