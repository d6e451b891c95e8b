"""The serving wing: the SavedModel's serving functions (TensorFlow graph code) and the
web page's login. Imports the core, model, io and evaluation wings, never training."""
