"""BrainG3N end to end: the demo chain, the site embedding command and the cluster configuration."""
