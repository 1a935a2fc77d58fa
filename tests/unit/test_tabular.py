"""Clinical tables: profiling at add, what researchers see, the job's encoding, bad input."""

from __future__ import annotations

import pytest

from common.messages import DatasetInfo
from node import datasets
from node.datasets import DatasetError
from node.db import Database
from node.loaders.tabular import Encoding, EncodingError, encode, prepare, public_columns
from node.registry import Registry
from researcher.tabular import aligned_encoding
from scripts import clinical

SECRET = "s3cr3t-v4lue"


def _write(path, text):
    path.write_text(text)
    return path


def test_profile_kinds_and_public_metadata(tmp_path):
    paths = clinical.write_sites(tmp_path, n_per_site=120, n_test=10)
    table = datasets.load("table", paths["site-2"], target="dx")
    cols = table.meta["columns"]
    assert cols["age"]["kind"] == "numeric" and cols["age"]["missing"] > 0
    assert cols["smoking"]["categories"]["unknown"] == 3  # the steward sees the rare category
    assert {cols["patient_id"]["kind"], cols["visit_date"]["kind"]} == {"dropped"}
    assert table.meta["features"] == ["age", "sex", "mmse", "abeta", "apoe", "smoking"]
    public = public_columns(cols)
    assert "unknown" not in public["smoking"]["categories"] and public["smoking"]["suppressed"] == 1
    reg = Registry(Database(tmp_path / "node.db"))
    info = reg.add("clinic", "table", paths["site-2"], ["dementia"], target="dx").public()
    assert info.columns == public and info.n_classes == 3
    assert "unknown" not in DatasetInfo.model_validate(info.model_dump()).model_dump_json()


def test_encoding_is_the_same_whatever_the_site_holds(tmp_path):
    a = _write(tmp_path / "a.csv", "age,sex,grade,dx\n70,F,low,AD\n,M,high,CN\n80,,mid,AD\n")
    b = _write(tmp_path / "b.csv", "age,sex,grade,dx\n60,M,low,CN\n65,M,,MCI\n")
    enc = {"numeric": ["age"], "one_hot": {"sex": ["F", "M"]}, "ordinal": {"grade": ["low", "mid", "high"]},
           "impute": "median", "classes": ["AD", "CN", "MCI"]}
    ea = prepare(datasets.load("table", a, target="dx"), {"encoding": enc})
    eb = prepare(datasets.load("table", b, target="dx"), {"encoding": enc})
    assert ea.meta["encoded_features"] == eb.meta["encoded_features"] == ["age", "sex=F", "sex=M", "grade"]
    assert ea.x.tolist() == [[70, 1, 0, 0], [75, 0, 1, 2], [80, 0, 0, 1]]  # median age, unknown sex: zeros
    assert eb.x.tolist() == [[60, 0, 1, 0], [65, 0, 1, 0]]  # median grade of (low) is low
    assert eb.y.tolist() == [1, 2]
    assert ea.meta["job_metrics"]["encoding_digest"] == eb.meta["job_metrics"]["encoding_digest"]


def test_aligned_encoding_is_the_union_of_public_categories():
    def info(name, cats):
        return DatasetInfo(name=name, tags=["t"], type="table", n_samples=50,
                           columns={"sex": {"kind": "categorical", "categories": cats},
                                    "dx": {"kind": "categorical", "categories": ["AD", "CN"]},
                                    "age": {"kind": "numeric"}})
    enc = aligned_encoding([info("a", ["F"]), info("b", ["F", "M"])], target="dx", one_hot=["sex"])
    assert enc["one_hot"] == {"sex": ["F", "M"]} and enc["classes"] == ["AD", "CN"] and enc["numeric"] == ["age"]


def test_a_job_must_say_how_to_encode_categories(tmp_path):
    table = datasets.load("table", _write(tmp_path / "t.csv", "age,sex,y\n1,F,0\n2,M,1\n"), target="y")
    with pytest.raises(EncodingError, match="1 categorical column"):
        prepare(table, {})
    with pytest.raises(EncodingError, match="'weight'"):
        encode(table, Encoding.of({"encoding": {"numeric": ["weight"]}}))
    string_target = datasets.load("table", _write(tmp_path / "s.csv", "age,dx\n1,AD\n2,CN\n"), target="dx")
    with pytest.raises(EncodingError, match="encoding.classes"):
        prepare(string_target, {})
    assert prepare(string_target, {"encoding": {"classes": ["AD", "CN"]}}).y.tolist() == [0, 1]


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("a,b\n", "header but no rows"),
    (f"a,b\n1,2\n3,{SECRET},4\n", "line 3 has 3 fields"),
    ("a,a\n1,2\n", "empty or repeated"),
    ("id,when\n" + "".join(f"{SECRET}{i},2020-01-0{i % 9 + 1}\n" for i in range(30)), "no usable feature"),
])
def test_bad_tables_are_refused_without_their_content(tmp_path, content, message):
    path = _write(tmp_path / "t.csv", content)
    reg = Registry(Database(tmp_path / "node.db"))
    with pytest.raises(DatasetError, match=message) as err:
        reg.add("t", "table", path, ["x"])
    assert SECRET not in str(err.value)
    assert reg.list() == []


def test_a_key_file_is_refused_and_not_quoted(tmp_path):
    lines = [f"{SECRET}{i:04d}QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=" for i in range(40)]
    key = _write(tmp_path / "node.key", "-----BEGIN PRIVATE KEY-----\n" + "\n".join(lines) + "\n-----END PRIVATE KEY-----\n")
    reg = Registry(Database(tmp_path / "node.db"))
    with pytest.raises(DatasetError) as err:
        reg.add("k", "table", key, ["x"])
    assert SECRET not in str(err.value) and "BEGIN" not in str(err.value)
    (tmp_path / "bin.csv").write_bytes(b"a,b\n\xff\xfe\x00" + SECRET.encode())
    with pytest.raises(DatasetError, match="not a UTF-8 CSV") as err:
        reg.add("b", "table", tmp_path / "bin.csv", ["x"])
    assert SECRET not in str(err.value)
    with pytest.raises(DatasetError, match="target column 'dx' is not in the header"):
        reg.add("k", "table", key, ["x"], target="dx")
    assert reg.list() == []


def test_csv_type_points_to_table_for_categories(tmp_path):
    with pytest.raises(DatasetError, match="--type table"):
        datasets.load("csv", _write(tmp_path / "c.csv", "a,b\n1,F\n"))
