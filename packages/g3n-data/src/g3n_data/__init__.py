"""BrainG3N ingest, preprocessing, synthetic cohort and splits -> volumes shards."""
