"""The model wing: the models and their files. The builders, DRENet's layers, backbones,
baselines, the ensemble and the losses are pure Keras 3 (no TensorFlow, any backend);
``saving`` writes and loads ``.keras`` files (``covid_keras.json``, the one ``load_model``),
``optimizers`` holds the serialisable optimisers a compiled ``.keras`` file names, and
``keras_private`` fences every use of Keras internals. Imports only the core wing."""
