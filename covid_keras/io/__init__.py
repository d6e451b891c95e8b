"""The io wing: what the tools read back from disk. ``data``: the TFRecords (schema of the
core wing) as a tf.data pipeline, and the dataset's manifest; ``run_dir``: a training run's
folder, every file name of it. Below training, evaluation and serving, which all read
both; imports the core and model wings."""
