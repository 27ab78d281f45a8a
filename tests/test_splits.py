import pytest

from jaxbrats.data.splits import kfold_split, ratio_split, read_split_file
from jaxbrats.errors import JaxbratsError

IDS = [f"case{i:03d}" for i in range(50)]


def test_ratio_split_partitions_deterministically():
    split = ratio_split(IDS, (0.7, 0.1, 0.2), seed=1)
    assert [len(split[k]) for k in ("train", "val", "test")] == [35, 5, 10]
    assert sorted(sum(split.values(), [])) == IDS
    assert split == ratio_split(list(reversed(IDS)), (0.7, 0.1, 0.2), seed=1)
    assert split != ratio_split(IDS, (0.7, 0.1, 0.2), seed=2)


def test_kfold_validation_folds_cover_every_case_once():
    vals = [kfold_split(IDS, 5, f, seed=0)["val"] for f in range(5)]
    assert sorted(sum(vals, [])) == IDS and all(len(v) == 10 for v in vals)
    split = kfold_split(IDS, 5, 0, seed=0)
    assert not set(split["train"]) & set(split["val"])
    with pytest.raises(JaxbratsError, match="fold 5"):
        kfold_split(IDS, 5, 5)


def test_split_file(tmp_path):
    path = tmp_path / "test.txt"
    path.write_text("# BraTS2018 split 3\ncase001\n\ncase007  # comment\n")
    assert read_split_file(path, IDS) == ["case001", "case007"]
    path.write_text("case001\nBraTS_unknown\n")
    with pytest.raises(JaxbratsError, match="unknown case id 'BraTS_unknown'") as info:
        read_split_file(path, IDS)
    assert str(path) in str(info.value)
    with pytest.raises(JaxbratsError, match="not found"):
        read_split_file(tmp_path / "nope.txt", IDS)
