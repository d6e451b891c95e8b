"""covid_keras: chest CT COVID-19 diagnosis with evidence, in TensorFlow / Keras 3.

Importing the package is cheap: it does not import TensorFlow or Keras. The TFRecord
schema lives in :mod:`covid_keras.schema` and is shared by data_prep (the writer) and the
training / export / predict code (the readers).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
