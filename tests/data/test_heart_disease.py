"""The UCI Heart Disease files shipped in fedloom: the published facts, checksums, and the example loader."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from fedloom.core.errors import ChecksumError, DataError
from fedloom.data import heart_disease
from fedloom.data.heart_disease import HOSPITALS, SHA256, packaged_dir, read_raw, read_table

REPO = Path(__file__).resolve().parents[2]

# Rows, rows with a missing value, and the count of each target value 0..4, per hospital: counted
# independently from the UCI files (heart-disease.names gives the row counts 303, 294, 123, 200).
FACTS = {
    "cleveland": (303, 6, [164, 55, 36, 35, 13]),
    "hungarian": (294, 293, [188, 106, 0, 0, 0]),
    "switzerland": (123, 123, [8, 48, 32, 30, 5]),
    "va": (200, 199, [51, 56, 41, 42, 10]),
}


@pytest.mark.parametrize("hospital", HOSPITALS)
def test_packaged_files_hold_the_published_records(hospital: str) -> None:
    rows, with_missing, per_target = FACTS[hospital]
    table = read_table(hospital)
    assert table.shape == (rows, 14)
    assert int(np.isnan(table).any(axis=1).sum()) == with_missing
    assert np.bincount(table[:, 13].astype(np.int64), minlength=5).tolist() == per_target
    x, y = read_raw(hospital)
    assert x.shape == (rows, 13)
    assert y.dtype == np.int64
    assert int(y.sum()) == rows - per_target[0]


def test_packaged_dir_holds_the_files_and_their_licence() -> None:
    folder = packaged_dir()
    for h in HOSPITALS:
        assert (folder / f"processed.{h}.data").is_file()
    licence = (folder / "LICENSE.txt").read_text(encoding="utf-8")
    assert "CC BY 4.0" in licence
    assert "10.24432/C52P4X" in licence
    assert (folder / "heart-disease.names").is_file()


def test_a_changed_packaged_file_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # The digest is what a tampered file would no longer match; changing the expectation is equivalent.
    monkeypatch.setitem(SHA256, "va", "0" * 64)
    with pytest.raises(ChecksumError, match=r"processed\.va\.data.*expected 0000"):
        read_table("va")
    with pytest.raises(ChecksumError):
        read_table("va", packaged_dir())  # the packaged folder named explicitly is still verified


def test_a_folder_of_ones_own_is_read_as_it_is(tmp_path: Path) -> None:
    shutil.copy(packaged_dir() / "processed.switzerland.data", tmp_path)
    assert np.array_equal(read_table("switzerland", tmp_path), read_table("switzerland"), equal_nan=True)
    with pytest.raises(DataError, match=r"processed\.va\.data does not exist"):
        read_table("va", tmp_path)
    (tmp_path / "processed.cleveland.data").write_text("63.0,1.0,1.0\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"processed\.cleveland\.data:1: expected 14"):
        read_table("cleveland", tmp_path)
    with pytest.raises(DataError, match="unknown hospital"):
        read_table("boston")


def test_the_example_loader_uses_the_packaged_copy_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO / "examples" / "heart_disease"))
    import heart_data

    try:
        train = heart_data.load_client("cleveland", None)
        test = heart_data.load_eval("all", None)
        assert len(train) == 303 - 61  # an 80/20 split: round(303 * 0.2) = 61 test rows
        assert len(test) == sum(round(FACTS[h][0] * 0.2) for h in HOSPITALS)
        assert heart_data.read_raw is heart_disease.read_raw
    finally:
        sys.modules.pop("heart_data", None)


def test_the_files_are_declared_package_data() -> None:
    import fnmatch
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"][
        "package-data"
    ]["fedloom.data.heart_disease"]
    for path in packaged_dir().iterdir():
        if path.suffix != ".py" and path.is_file():
            assert any(fnmatch.fnmatch(path.name, pattern) for pattern in declared), path.name
