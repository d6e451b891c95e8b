"""Seeded synthetic chest CT phantom, written as real DICOM series.

    python -m data_prep.phantom --output_dir=runs/demo/studies --patients_per_kind=10

SYNTHETIC DATA -- NOT REAL PATIENTS. Every image this module produces is drawn from ellipses,
arcs and Gaussian noise by a seeded random generator. No voxel comes from a real scan or a
real person; names, ids, dates and UIDs are made up. The phantom exists so that tests,
benchmarks and ``make demo`` can exercise the DICOM -> TFRecord pipeline end to end without
any patient data. It is not a medical model: do not use it to judge diagnostic performance.

Anatomy (Hounsfield units, float32, shape ``(num_slices, matrix, matrix)``, axial slices from
head (index 0, superior) to feet; image left = patient right, image top = anterior):

* air outside the body -1000 HU; body ellipse of soft tissue (about 35 HU) inside a
  subcutaneous fat rim (about -100 HU); mild Gaussian noise everywhere inside the body.
* The stack runs neck -> thorax -> upper abdomen: the first 15 % of the slices are neck (small
  body, trachea as a central air circle, cervical spine, no lungs); the next 65 % are thorax
  (two kidney-shaped lungs at about -850 HU whose size follows a smooth bell over z: small at
  the apex and base, largest mid-stack; vessels as bright dots and curvy lines; mediastinum,
  heart and aorta at about +40 HU; spine, ribs and sternum at +400...+1000 HU); the last 20 %
  are upper abdomen (liver +55 HU on the image left, spleen, stomach, kidneys; no lung).
* Disease patterns inside the lungs, by ``kind`` (see :data:`KINDS`):

  - ``"covid"``: bilateral, peripheral (subpleural) ground-glass patches, -600...-300 HU.
  - ``"bacterial"``: lobar consolidation 0...+50 HU in one lobe and a smaller one in the other
    lobe of the same lung, so every lung slice shows disease (unilateral for about 75 % of
    seeds); on the lowest slices of a lower-lobe pneumonia it fills most of that lung.
  - ``"viral"``: diffuse bilateral patchy ground glass, central / peribronchovascular,
    -700...-450 HU.
  - ``"tuberculosis"``: upper-lobe dense nodules (+20...+60 HU) and 1-2 cavities (air with a
    soft-tissue wall) on the apical slices.
  - ``"normal"``: no lesions.

  ``dense_consolidation=True`` additionally fills one whole lung (all thoracic slices) with
  consolidation (0...+50 HU) -- for any kind; for ``"bacterial"`` it is the affected lung. A
  lung mask must not vanish on such a study.

Determinism: everything is drawn from :class:`numpy.random.Generator` streams seeded by
``seed``; the same arguments give bit-identical files (UIDs come from
``pydicom.uid.generate_uid(entropy_srcs=...)``, dates from hashes, never from the clock).
The anatomy, noise and vessel streams do not depend on ``kind``: ``make_volume_hu("normal",
seed=s)`` and ``make_volume_hu("covid", seed=s)`` differ only where lesions are, which tests
use to locate lesions.

DICOM: one CT Image Storage file per slice, Explicit VR Little Endian, with the attributes a
real scanner writes (patient / study / series / frame of reference / image plane / image
pixel / CT image modules). Pixel data is stored = round((HU - intercept) / slope): unsigned
with BitsStored 12 for the usual intercept -1024 (slope 1), signed 16-bit when the intercept
is above -1024 (e.g. 0, so negative HU are stored as negative values).

Command line (absl flags)::

    python -m data_prep.phantom --output_dir=/tmp/phantom --kinds=normal,covid,bacterial \\
        --patients_per_kind=4 --num_slices=40 --matrix=128 --seed=0 --layout=folders

Modules: ``anatomy`` (the constants, the anatomy and lesion plans), ``render`` (the HU
volume: :func:`make_volume_hu`), ``dicom`` (the files: :func:`write_series`,
:func:`write_localizer`, :func:`write_study`, :func:`write_dataset`) and ``cli`` (the
command). The names above are importable from the package, as before.
"""

from __future__ import annotations

# the public names, and the module constants that were importable from the single module
from data_prep.phantom.anatomy import (  # noqa: F401
    HU_AIR,
    HU_MAX,
    HU_MIN,
    KINDS,
    NECK_END,
    THORAX_END,
)
from data_prep.phantom.cli import main  # noqa: F401
from data_prep.phantom.dicom import (  # noqa: F401
    INSTITUTION,
    MANUFACTURER,
    SYNTHETIC_NOTE,
    write_dataset,
    write_localizer,
    write_series,
    write_study,
)
from data_prep.phantom.render import make_volume_hu

__all__ = [
    "KINDS",
    "make_volume_hu",
    "write_series",
    "write_localizer",
    "write_study",
    "write_dataset",
]
