"""data_prep: chest CT studies -> sharded TFRecords (offline, CPU)."""
