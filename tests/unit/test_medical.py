"""Medical images: NIfTI subject folders and DICOM series, their public metadata, the job's
selection, and bad input refused at `dataset add` with the reason and without file content."""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pytest
import torch

from common.training.zoo import ZOO
from node import admin, datasets
from node.db import Database
from node.loaders import prepare
from node.loaders.medical import SelectionError
from node.registry import Registry
from scripts import imaging

pytest.importorskip("nibabel")
pytest.importorskip("pydicom")

SECRET = "hunter2-SECRET"


def _add(tmp_path, kind, path, **kw):
    db = Database(tmp_path / "node" / "node.db")
    return db, admin.add_dataset(db, "steward", "imgs", kind, path, ["mri"], **kw)


def _refused(tmp_path, kind, path, match, **kw):
    db = Database(tmp_path / "node" / "node.db")
    with pytest.raises(admin.AdminError, match=match) as info:
        admin.add_dataset(db, "steward", "imgs", kind, path, ["mri"], **kw)
    assert Registry(db).list() == []  # nothing registered
    return str(info.value)


def test_medical_folder_metadata_warnings_and_selection(tmp_path):
    folder = imaging.write_medical_folder(tmp_path / "mf", 12, 1, site="site-2")
    (folder / "sub-01000" / "FLAIR.nii.gz").unlink()  # a subject lacking a modality
    shutil.copytree(folder / "sub-01001", folder / "sub-extra")  # a subject without a CSV row
    (tmp_path / "node").mkdir()
    db, ds = _add(tmp_path, "medical-folder", folder)
    info = ds.public()
    assert info.type == "medical-folder" and info.n_samples == 13
    assert info.imaging["modalities"]["T1"] == {"subjects": 13, "shape": [16, 16, 16], "spacing": [1.2, 1.0, 1.0]}
    assert info.imaging["modalities"]["FLAIR"]["subjects"] == 12
    assert info.imaging["complete_subjects"] == 12
    assert sorted(info.columns) == ["age", "diagnosis", "sex"]  # the subject column is not published
    assert info.columns["diagnosis"]["categories"] == ["case", "control"]
    public = info.model_dump_json()
    assert "sub-" not in public and str(folder) not in public  # no subject, no path
    warnings = ds.meta["warnings"]
    assert any("1 subject(s) lack FLAIR: sub-01000" in w for w in warnings)
    assert any("1 subject(s) have no row in demographics.csv: sub-extra" in w for w in warnings)

    data = datasets.load("medical-folder", folder)
    targs = {"modalities": ["T1", "FLAIR"], "label": "diagnosis", "classes": ["control", "case"]}
    sel = prepare(data, targs)
    assert sel.x.shape == (11, 2, 16, 16, 16)  # 13 minus one without FLAIR, one without a label
    assert sel.y.tolist() == [1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    assert sel.meta["job_metrics"]["subjects_left_out"] == 2.0
    cov = prepare(data, {"modalities": ["T1"], "label": "diagnosis", "classes": ["control", "case"],
                         "covariates": ["age"], "covariate_scale": {"age": [70, 10]}, "spatial_size": [8, 8, 8]})
    assert cov.x.shape == (12, 8 * 8 * 8 + 1)
    with pytest.raises(SelectionError, match="no modality 'PD'"):
        prepare(data, {"modalities": ["PD"]})
    with pytest.raises(SelectionError, match="no column 'mmse'"):
        prepare(data, {"label": "mmse"})
    model = ZOO["cnn3d"]({"in_channels": 1, "spatial_size": [8, 8, 8], "n_covariates": 1}, {}).build_model()
    assert model(cov.x).shape == (12, 2)


def test_dicom_series_sorted_and_nothing_identifying_kept(tmp_path):
    rng = np.random.default_rng(0)
    vol = imaging.volume(1, 12, rng, 200.0)
    imaging.write_dicom_series(tmp_path / "dc" / "subj-a", vol, patient=7, intercept=-100.0, shuffle=rng)
    imaging.write_dicom_series(tmp_path / "dc" / "subj-b", vol, patient=8, shuffle=rng)
    (tmp_path / "dc" / "demographics.csv").write_text("subject,age,diagnosis\nsubj-a,70,case\nsubj-b,71,control\n")
    (tmp_path / "node").mkdir()
    db, ds = _add(tmp_path, "dicom", tmp_path / "dc")
    assert ds.public().imaging["modalities"]["MR"] == {"subjects": 2, "shape": [12, 12, 12], "spacing": [2.0, 1.0, 1.0]}
    data = datasets.load("dicom", tmp_path / "dc")
    # slices were written shuffled: sorted back by position, rescaled by the intercept
    np.testing.assert_allclose(data.volumes["MR"]["subj-a"], np.floor(vol + 100.0) - 100.0, atol=1e-3)
    stored = json.dumps([ds.meta, ds.public().model_dump()])
    for marker in (*imaging.PATIENT_MARKERS, "St Elsewhere", "1.2.826"):
        assert marker not in stored
    assert prepare(data, {"label": "diagnosis", "classes": ["control", "case"]}).y.tolist() == [1, 0]


def test_corrupt_nifti_is_refused(tmp_path):
    folder = imaging.write_medical_folder(tmp_path / "mf", 4, 1)
    raw = gzip.decompress((folder / "sub-01002" / "T1.nii.gz").read_bytes())
    (folder / "sub-01002" / "T1.nii.gz").write_bytes(gzip.compress(raw[:400]))  # truncated
    message = _refused(tmp_path, "medical-folder", folder, r"sub-01002/T1.nii.gz is not a readable NIfTI image")
    assert "\\x" not in message


def test_a_key_file_as_nifti_is_refused_without_its_content(tmp_path):
    folder = imaging.write_medical_folder(tmp_path / "mf", 2, 1)
    (folder / "sub-01000" / "T1.nii").write_text(f"-----BEGIN PRIVATE KEY-----\n{SECRET}\n")
    message = _refused(tmp_path, "medical-folder", folder, "not a readable NIfTI image")
    assert SECRET not in message and "PRIVATE" not in message


def test_demographics_without_subject_column_is_refused(tmp_path):
    folder = imaging.write_medical_folder(tmp_path / "mf", 4, 1)
    (folder / "demographics.csv").write_text(f"{SECRET},age,diagnosis\nsub-01000,70,case\n")
    message = _refused(tmp_path, "medical-folder", folder, r"demographics.csv has no subject column")
    assert SECRET not in message


def test_dicom_mixed_series_in_one_subject_folder_is_refused(tmp_path):
    rng = np.random.default_rng(1)
    imaging.write_dicom_series(tmp_path / "dc" / "subj-a", imaging.volume(0, 8, rng, 200.0), patient=1)
    other = tmp_path / "other"
    imaging.write_dicom_series(other, imaging.volume(1, 8, rng, 200.0), patient=1)
    for f in other.iterdir():
        shutil.copy(f, tmp_path / "dc" / "subj-a" / f"B{f.name}")
    message = _refused(tmp_path, "dicom", tmp_path / "dc", r"subj-a: holds slices of 2 different series")
    assert "Doe" not in message and "MRN" not in message


@pytest.mark.parametrize(("damage", "match"), [
    ("drop", "unevenly spaced"),
    ("resize", "differ in size"),
])
def test_dicom_inconsistent_series_is_refused(tmp_path, damage, match):
    import pydicom

    rng = np.random.default_rng(2)
    series = tmp_path / "dc" / "subj-a"
    imaging.write_dicom_series(series, imaging.volume(0, 8, rng, 200.0), patient=1)
    files = sorted(series.iterdir(), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    if damage == "drop":
        files[3].unlink()  # a missing slice
    else:
        ds = pydicom.dcmread(files[2])
        ds.Rows, ds.Columns = 4, 16
        ds.save_as(files[2])
    message = _refused(tmp_path, "dicom", tmp_path / "dc", match)
    assert "Doe" not in message


def test_not_dicom_with_dcm_suffix_is_refused(tmp_path):
    (tmp_path / "dc" / "subj-a").mkdir(parents=True)
    (tmp_path / "dc" / "subj-a" / "IM0001.dcm").write_text(SECRET)
    message = _refused(tmp_path, "dicom", tmp_path / "dc", "IM0001.dcm is not a DICOM file")
    assert SECRET not in message


def test_monai_plan_builds_and_steps():
    pytest.importorskip("monai")
    plan = ZOO["monai_classifier"]({"in_channels": 2, "spatial_size": [16, 16, 16], "n_covariates": 1},
                                   {"augment": True})
    model = plan.build_model()
    x = torch.cat([torch.rand(3, 2 * 4096) * 300, torch.rand(3, 1)], dim=1)
    loss = plan.training_step(model, x, torch.tensor([0, 1, 0]))
    loss.backward()
    assert model(x).shape == (3, 2)
    assert all(v.is_floating_point() for v in model.state_dict().values())
