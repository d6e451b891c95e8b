"""Saving and loading the project's ``.keras`` models, with what a user needs to run them.

A ``.keras`` file written by :func:`save_model` carries, beside Keras's own entries, a
``covid_keras.json`` entry: the class names (in output order), the backbone, the input
size and the input normalisation (``caffe``, ``torch`` or ``tf``, as
``keras.applications``) and whether the model applies it itself
(``include_preprocessing``: its first layer is ``BackboneNormalization`` and it takes RGB
pixel values 0..255; absent or false: it takes them normalised, as every model saved before
the layer), the model kind, ``navigator_anchors`` (``"lung"``: a DRENet whose navigator
chooses among the anchors on the lung mask, which it takes as a second input
``lung_mask``; only such a model has the key, so that an older reader still reads a
default model's file) and the package version. :func:`load_model`
returns the model with that dictionary as ``model.covid_keras_info``, so a loaded model can
be used without reading the run folder. Keras ignores the extra entry.

Keras 3 has no plug-in registry: its ``keras.models.load_model`` finds the project's
classes (DRENet, its layers, the coupled optimisers) once they are registered, i.e. after
``import covid_keras.model.drenet`` (or :func:`register`). ``covid_keras.load_model(path)``
(:func:`load_model`) does that for you. No TensorFlow here: it works under every backend.
"""

from __future__ import annotations

import io
import json
import os
import zipfile

INFO_ENTRY = "covid_keras.json"


def register() -> None:
    """Registers every serialisable class of the project with Keras."""
    import covid_keras.model.baselines  # noqa: F401
    import covid_keras.model.drenet  # noqa: F401
    import covid_keras.model.ensemble  # noqa: F401
    import covid_keras.model.layers  # noqa: F401
    import covid_keras.model.optimizers  # noqa: F401


def model_info(model, class_names: list[str]) -> dict:
    """The dictionary stored with ``model`` (see the module docstring)."""
    from covid_keras import __version__
    from covid_keras.model.backbones import PREPROCESSING

    spec = model_spec(model)
    build = getattr(model, "build_config", None)
    variant = build.get("variant") if isinstance(build, dict) else None
    if len(class_names) != spec["num_classes"]:
        raise ValueError(f"{len(class_names)} class names for a model with "
                         f"{spec['num_classes']} outputs: {class_names}")
    return {"class_names": list(class_names), "backbone": spec["backbone"],
            "input_size": spec["input_size"],
            "preprocessing": PREPROCESSING.get(spec["backbone"]), "model": spec["model"],
            "variant": variant, "input_norm": spec["input_norm"],
            "include_preprocessing": spec["include_preprocessing"],
            "members": spec.get("members", 1),
            "covid_keras_version": __version__,
            # only a lung model's file says so (an older reader knows no such key)
            **({LUNG_SPEC_KEY: spec[LUNG_SPEC_KEY]} if LUNG_SPEC_KEY in spec else {})}


def save_model(model, path: str, class_names: list[str] | None) -> None:
    """``model.save`` to a temporary file, the info entry added (when the class names are
    given), then moved into place whole (any file system ``covid_keras.core.files`` knows)."""
    import tempfile

    from covid_keras.core import files

    info = model_info(model, class_names) if class_names else None
    if files.is_remote(path):
        fd, tmp = tempfile.mkstemp(suffix=".keras")
        os.close(fd)
    else:
        tmp = f"{path}.{files.unique_suffix()}.keras"
    try:
        model.save(tmp)
        if info is not None:
            with zipfile.ZipFile(tmp, "a") as z:
                z.writestr(INFO_ENTRY, json.dumps(info, indent=2))
        files.put_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_json_entry(path: str, name: str) -> dict | None:
    """One JSON entry of a ``.keras`` file (``None`` when the file has no such entry)."""
    from covid_keras.core import files

    try:
        # files.read_bytes: the remote file systems without naming TensorFlow here
        source = io.BytesIO(files.read_bytes(path)) if files.is_remote(path) else path
        with zipfile.ZipFile(source) as z:
            if name not in z.namelist():
                return None
            return json.loads(z.read(name))
    except (OSError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a readable .keras model ({type(exc).__name__}: "
                         f"{exc})") from None


def read_info(path: str) -> dict | None:
    """The info entry of a ``.keras`` file (``None`` for a file saved without it)."""
    return _read_json_entry(path, INFO_ENTRY)


def load_model(path: str, compile: bool = True):
    """``keras.saving.load_model`` with the project's classes registered, and the stored
    info as ``model.covid_keras_info`` (``None`` when the file has none). The one loader:
    ``covid_keras.load_model``, ``evaluation.load_model`` and :class:`~covid_keras.io.run_dir.
    RunDir` come here."""
    import keras

    from covid_keras.core import files

    if not files.exists(path):
        raise FileNotFoundError(f"No model file {path}")
    register()
    info = read_info(path)
    model = keras.saving.load_model(path, compile=compile)
    object.__setattr__(model, "covid_keras_info", info)
    return model


#: The keys of :func:`model_spec`.
SPEC_KEYS = ("backbone", "input_size", "num_classes", "model", "input_norm",
             "include_preprocessing")
#: A key only a DRENet built with ``navigator_anchors="lung"`` has in its spec (value
#: ``"lung"``: it takes the lung mask as a second input); absent: every anchor ("all").
LUNG_SPEC_KEY = "navigator_anchors"


def takes_lung_mask(info: dict) -> bool:
    """Whether a model spec or export info is a lung DRENet's: its navigator is restricted
    to the lung, so it (and predict_study, gradcam) takes the lung mask too."""
    return info.get(LUNG_SPEC_KEY, "all") == "lung"


def saved_model_spec(path: str) -> dict:
    """:func:`model_spec` of a ``.keras`` file (no weights loaded)."""
    return model_spec(path)


def model_spec(source, where: str | None = None) -> dict:
    """Backbone, input size, number of classes, model kind (``drenet`` / ``classifier``) and
    input normalisation (``input_norm``) of a model (and ``navigator_anchors: "lung"`` for a
    DRENet that takes the lung mask, :data:`LUNG_SPEC_KEY`), whether it normalises its own input
    (``include_preprocessing``: it takes RGB pixel values 0..255; false for every model
    saved before the layer, which takes them normalised as the backbone expects): what
    ``train --init_from``, evaluation and the benchmarks need to feed it the way it was
    trained. The one implementation.

    ``source``: a ``.keras`` path (its config and covid_keras.json are read, no weights), a
    built model, or a serialised model (``keras.saving.serialize_keras_object`` of a built
    model, or a ``.keras`` file's config.json). What :func:`save_model` stored
    (covid_keras.json: backbone, input size, input_norm) wins; a DRENet's ``build_config``
    holds all of it; a classifier saved without the entry (plain ``model.save``) is read
    from its config. ``where`` names the model in errors."""
    info = None
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        config = _read_json_entry(path, "config.json")
        if config is None:
            raise ValueError(f"{path} is not a readable .keras model (no config.json)")
        info, where = read_info(path), where or path
    elif isinstance(source, dict):
        config = source
    else:
        import keras

        info = getattr(source, "covid_keras_info", None)
        config = keras.saving.serialize_keras_object(source)
    spec = _config_spec(config, where or "model")
    for key in ("backbone", "input_size", "input_norm"):
        if info and info.get(key) is not None:
            spec[key] = int(info[key]) if key == "input_size" else info[key]
    return spec


def _config_spec(config: dict, where: str) -> dict:
    members = [lay for lay in config.get("config", {}).get("layers", [])
               if lay.get("config", {}).get("name", "").startswith("member_")]
    if members:  # an ensemble (covid_keras.model.ensemble): its members' spec, and how many
        spec = _config_spec(members[0], where)
        spec["members"] = len(members)
        return spec
    if config.get("class_name") == "DRENet":
        b = config["config"]["build_config"]
        spec = {"backbone": b["backbone"], "input_size": int(b["input_size"]),
                "num_classes": int(b["num_classes"]), "model": "drenet",
                "input_norm": b.get("input_norm", "none"),
                "include_preprocessing": bool(b.get("include_preprocessing", False))}
        # "lung": the model also takes the lung mask (a second, named input); "all" (a
        # model saved before the option too) leaves the spec as it always was
        if b.get("navigator_anchors", "all") != "all":
            spec[LUNG_SPEC_KEY] = b["navigator_anchors"]
        return spec
    layers_ = config.get("config", {}).get("layers", [])
    # build_backbone names the backbone model <arch>_backbone: the only record of the
    # architecture in a classifier saved without covid_keras.json.
    backbone = next((lay["config"]["name"][: -len("_backbone")] for lay in layers_
                     if lay["config"].get("name", "").endswith("_backbone")), None)
    size = next((lay["config"]["batch_shape"][1] for lay in layers_
                 if lay.get("class_name") == "InputLayer"), None)
    classes = next((lay["config"]["units"] for lay in layers_
                    if lay["config"].get("name") == "logits"), None)
    if backbone is None or size is None or classes is None:
        raise ValueError(f"{where}: not a covid_keras model (no backbone, input "
                         "size or logits layer in its config)")
    norm = "per_image" if any(lay.get("class_name") == "PerImageStandardization"
                              for lay in layers_) else "none"
    own = any(lay.get("class_name") == "BackboneNormalization" for lay in layers_)
    return {"backbone": backbone, "input_size": int(size), "num_classes": int(classes),
            "model": "classifier", "input_norm": norm, "include_preprocessing": own}
