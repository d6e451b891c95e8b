"""data_prep.settings.PrepSettings: the one home of the scan and preparation settings,
written into manifest.json by build_tfrecords and read back by export and predict; older
manifests and exports (without the block) read as before (issue 28 item 3)."""

from __future__ import annotations

import copy
import json

from data_prep.limits import Limits
from data_prep.lung import LungMaskParams
from data_prep.preprocess import PrepConfig
from data_prep.settings import DEFAULTS, EXPORT_KEY, MANIFEST_KEY, PrepSettings
from data_prep.study import ScanConfig
from tests.helpers import fake_manifest

FLAGS = ("--num_slices=12", "--sampling=middle50", "--fill_blank=none",
         "--min_lung_fraction=0.1", "--image_window=-600,1200", "--max_file_mb=100",
         "--max_image_pixels=1000000", "--gas_median_hu=-850", "--windows=lung")


def test_the_configs_defaults_are_the_settings_defaults():
    assert PrepConfig() == PrepConfig.from_settings(DEFAULTS)
    assert ScanConfig(salt=b"s") == ScanConfig.from_settings(DEFAULTS, b"s")
    assert PrepSettings.from_configs(ScanConfig(salt=b""), PrepConfig()) == DEFAULTS
    assert (DEFAULTS.num_slices, DEFAULTS.min_slices, DEFAULTS.sampling) == (15, 8, "paper")


def test_to_dict_round_trips_through_json():
    s = PrepSettings(num_slices=9, sampling="middle50", image_size=96,
                     windows=(("lung", -700.0, 1500.0), ("mediastinal", 40.0, 350.0),
                              ("bone", 400.0, 1800.0)),
                     image_window_hu=(-600.0, 1200.0), max_file_bytes=12345,
                     lung=LungMaskParams(gas_median_hu=-850.0), fill_blank="none")
    block = json.loads(json.dumps(s.to_dict(), allow_nan=False))
    assert PrepSettings.from_dict(block) == s
    assert PrepSettings.from_dict({**block, "a_newer_setting": 1}) == s
    assert PrepSettings.from_dict({}) == DEFAULTS
    # the run's time and memory caps are the caller's; the file and pixel limits the settings'
    scan = ScanConfig.from_settings(s, b"k", Limits(study_timeout_s=5.0))
    assert scan.limits == Limits(max_file_bytes=12345, study_timeout_s=5.0)
    assert (scan.salt, scan.num_slices, scan.sampling) == (b"k", 9, "middle50")


def test_build_tfrecords_writes_the_block_and_an_old_manifest_reads_the_same(tiny_dataset):
    """The block a run writes holds its flags; the same manifest without the block (as an
    older data_prep wrote it) is read to the same settings from its other entries."""
    manifest = json.loads((tiny_dataset(flags=FLAGS) / "manifest.json").read_text())
    settings = PrepSettings.from_manifest(manifest)
    assert settings == PrepSettings(
        num_slices=12, sampling="middle50", min_slices=5, image_window_hu=(-600.0, 1200.0),
        max_file_bytes=100 * 1024 * 1024, max_image_pixels=1000000, image_size=64,
        fill_blank="none", min_lung_fraction=0.1, lung=LungMaskParams(gas_median_hu=-850.0))
    assert manifest[MANIFEST_KEY] == settings.to_dict()
    old = {k: v for k, v in manifest.items() if k != MANIFEST_KEY}
    assert PrepSettings.from_manifest(old) == settings
    # the contracts of the older entries are unchanged
    assert manifest["preprocessing"]["fill_blank"] == "none"
    assert manifest["flags"]["num_slices"] == 12 and manifest["image"]["size"] == 64


def test_older_manifests_fall_back_as_before(tmp_path):
    # the manifest of tests/helpers (flags and preprocessing, no block)
    manifest = json.loads((fake_manifest(tmp_path / "d", 80) / "manifest.json").read_text())
    assert PrepSettings.from_manifest(manifest) == PrepSettings(image_size=80, min_slices=5)
    # without a preprocessing entry: data_prep's defaults at the records' size and windows
    old = {"image": {"size": 96}, "windows": [
        {"name": "mediastinal", "level_hu": 40.0, "width_hu": 350.0}],
        "flags": {"min_slices": 3, "max_file_mb": 1.5}}
    assert PrepSettings.from_manifest(old) == PrepSettings(
        image_size=96, windows=(("mediastinal", 40.0, 350.0),), min_slices=3,
        max_file_bytes=int(1.5 * 1024 * 1024))
    assert PrepSettings.from_manifest({}, input_size=32) == PrepSettings(image_size=32)


def test_export_carries_the_settings_and_predict_reads_them(tiny_dataset):
    from covid_keras.serving import exporter, predictor

    data_dir = tiny_dataset(flags=FLAGS)
    prep, warnings = exporter.data_prep_settings({"flags": {"data_dir": str(data_dir)}}, 64)
    assert not warnings
    settings = PrepSettings.from_manifest(json.loads((data_dir / "manifest.json").read_text()))
    assert prep["settings"] == settings.to_dict()
    assert prep["windows"] == settings.windows_json()
    info = {"input_size": 64, "windows": prep["windows"],
            "data_prep": {k: prep[k] for k in ("records_image_size", "flags", "preprocessing",
                                               EXPORT_KEY)}}
    scan, prep_cfg = predictor.prep_configs(info, b"salt")
    assert (scan, prep_cfg) == (ScanConfig.from_settings(settings, b"salt"),
                              PrepConfig.from_settings(settings))
    # an export made before the block: the same from its flags and preprocessing
    older = copy.deepcopy(info)
    del older["data_prep"][EXPORT_KEY]
    assert predictor.prep_configs(older, b"salt") == (scan, prep_cfg)
    # an export that knew nothing of the data: data_prep's defaults at the input size
    unknown, warnings = exporter.data_prep_settings(None, 48)
    assert warnings and unknown["settings"] is None
    bare = {"input_size": 48, "windows": unknown["windows"],
            "data_prep": {k: unknown[k] for k in ("records_image_size", "flags",
                                                  "preprocessing", EXPORT_KEY)}}
    assert predictor.prep_configs(bare, b"s") == (ScanConfig.from_settings(DEFAULTS, b"s"),
                                                  PrepConfig(image_size=48))
