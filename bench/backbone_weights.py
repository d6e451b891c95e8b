r"""Writes the backbone of a trained model as a file that ``--backbone_weights`` reads.

Used to start DRENet from a plain classifier trained on the same training split (the
classifier's backbone stands in for the ImageNet weights the papers start from):

  .venv/bin/python bench/backbone_weights.py \
      --model=runs/covid_ct_resnet50/best.keras --output=runs/r50_backbone.weights.h5
  .venv/bin/python -m covid_keras.train --flagfile=configs/covid_ct_drenet_scratch.cfg \
      --backbone_weights=runs/r50_backbone.weights.h5 ...

The file holds the keras.applications model of the architecture (include_top=False), so
``keras.applications.ResNet50(include_top=False, weights=FILE)`` loads it as it loads
ImageNet's; the tiny backbone's file holds the project's backbone model. Only the weights of
the image's own backbone are taken (for DRENet, not its branch batch norms).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from common import parser  # noqa: E402


def write_backbone_weights(model, output: str) -> str:
    """Saves ``model``'s image backbone to ``output`` (``covid_keras.training.
    transfer.write_image_backbone``, as ``--classifier_flagfile``'s stage does); returns the
    architecture's name."""
    from covid_keras.training.transfer import write_image_backbone

    if not output.endswith(".weights.h5"):
        raise ValueError(f"--output must end in .weights.h5. Received: {output}")
    return write_image_backbone(model, output)


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--model", required=True,
                   help="a trained model (.keras: a run's best.keras or final.keras)")
    p.add_argument("--output", required=True,
                   help="the weights file to write (must end in .weights.h5)")
    args = p.parse_args(argv)
    from covid_keras.core import cli

    cli.import_keras_quietly()
    from covid_keras.model.saving import load_model

    try:
        model = load_model(args.model, compile=False)
        arch = write_backbone_weights(model, args.output)
    except (OSError, ValueError) as exc:
        print(f"backbone_weights: error: {exc}", file=sys.stderr)
        return 1
    print(f"{arch} backbone of {args.model} written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
