"""covid_keras: chest CT COVID-19 diagnosis with evidence, in TensorFlow / Keras 3.

``import covid_keras`` is cheap (no TensorFlow, no Keras): the model builders load on first
use. The TFRecord schema is :mod:`covid_keras.core.schema`, shared by data_prep (the writer) and
the readers.

    from covid_keras import build_drenet, build_classifier, load_model
    model = load_model("runs/x/best.keras")   # + model.covid_keras_info: classes, input...
"""

__version__ = "0.1.0"

_LAZY = {
    "build_drenet": ("covid_keras.model.drenet", "build_drenet"),
    "DRENet": ("covid_keras.model.drenet", "DRENet"),
    "build_classifier": ("covid_keras.model.baselines", "build_classifier"),
    "build_resnet50_five_class": ("covid_keras.model.baselines", "build_resnet50_five_class"),
    "build_backbone": ("covid_keras.model.backbones", "build_backbone"),
    "load_model": ("covid_keras.model.saving", "load_model"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'covid_keras' has no attribute {name!r}")
