"""The training wing: what the trainer (``python -m covid_keras.train``) and pretraining
are made of: optimiser recipes, callbacks, the multi-worker loop, batch-norm statistics,
SimCLR's pieces, folds and ``--folds`` cross-validation, backbone transfer between runs.
Imports the core, model, io and evaluation wings (the trainer validates, chooses its
checkpoint and its patient decision with evaluation's code)."""
