"""A trained backbone carried to the next run: ``--classifier_flagfile``'s stage and the
benchmarks write a model's image backbone as the file ``--backbone_weights`` reads."""

from __future__ import annotations


def write_image_backbone(model, path: str) -> str:
    """Writes ``model``'s image backbone (not DRENet's branch batch norms) as the file that
    ``--backbone_weights`` reads (:func:`covid_keras.model.backbones.save_backbone_weights`);
    returns the architecture's name."""
    from covid_keras.evaluation.gradcam import image_backbone
    from covid_keras.model.backbones import save_backbone_weights
    from covid_keras.model.saving import model_spec

    arch = model_spec(model)["backbone"]
    save_backbone_weights(image_backbone(model), arch, path)
    return arch
