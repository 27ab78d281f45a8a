"""Splits: seeded ratios and folds, and the split lists papers publish, read as their authors wrote them.

The list files here are made up, in the published formats (docs/usage.md#splits): M3AE's and
ProtoKD's bare BraTS 2018 folder names, RFNet's BraTS 2020 names with a grade prefix, paths.
"""

from pathlib import Path

import pytest

from jaxbrats.config import ConfigError
from jaxbrats.data.splits import (
    check_split_counts,
    check_split_total,
    kfold_split,
    ratio_split,
    read_split_file,
    read_split_files,
)
from jaxbrats.engine.workdir import resolve_splits
from jaxbrats.errors import JaxbratsError
from jaxbrats.methods import load_config

IDS = [f"case{i:03d}" for i in range(50)]
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
B18 = ["Brats18_2013_5_1", "Brats18_2013_15_1", "Brats18_CBICA_AAA_1", "Brats18_TCIA01_101_1", "Brats18_TCIA09_102_1"]
B20 = [f"BraTS20_Training_{i:03d}" for i in (1, 2, 10, 100, 300)]
KEYS = {name: f"data.{name}_split" for name in ("train", "val", "test")}


def _write(path: Path, lines, newline="\n") -> Path:
    path.write_bytes(newline.join(lines).encode() + newline.encode())
    return path


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


@pytest.mark.parametrize(
    "lines, newline",
    [
        (B18[:3], "\n"),  # M3AE's dataset/train3.txt, ProtoKD's data/train_list.txt: bare folder names
        (B18[:3], "\r\n"),  # the same saved on Windows
        (["HGG/Brats18_2013_5_1", "LGG/Brats18_2013_15_1/", "/data/HGG/Brats18_CBICA_AAA_1"], "\n"),  # paths
        (["Brats18_2013_5_1.npy", "HGG_Brats18_2013_15_1_vol.npy", "Brats18_CBICA_AAA_1_flair.nii.gz"], "\n"),
        (["# split 3", "", "Brats18_2013_5_1  ", "\tBrats18_2013_15_1 # a comment", "", "Brats18_CBICA_AAA_1"], "\n"),
    ],
    ids=["bare", "crlf", "paths", "file-names", "comments-blanks"],
)
def test_brats2018_lists_in_their_published_formats(tmp_path, lines, newline):
    path = _write(tmp_path / "train3.txt", lines, newline)
    assert read_split_file(path, B18) == B18[:3]


def test_rfnet_brats2020_names_with_their_grade_prefix(tmp_path):
    # RFNet's release names its preprocessed cases HG_/LG_ + the folder name; a BOM and CR line ends too.
    path = tmp_path / "test.txt"
    path.write_bytes("\ufeffHG_BraTS20_Training_001\rLG_BraTS20_Training_300\rHG_BraTS20_Training_010\r".encode())
    assert read_split_file(path, B20) == [B20[0], B20[4], B20[2]]
    _write(path, ["BraTS20_Training_002", "hg_brats20_training_100_vol.npy"])  # bare; another case
    assert read_split_file(path, B20) == [B20[1], B20[3]]


def test_cases_the_cache_lacks_are_one_line_naming_the_file_and_the_first(tmp_path):
    path = _write(tmp_path / "val3.txt", ["Brats18_2013_5_1", *[f"Brats18_TCIA02_{i}_1" for i in range(5)]])
    with pytest.raises(JaxbratsError) as info:
        read_split_file(path, B18, key="data.val_split", cache="the cache /c")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"data.val_split ({path}): 5 of its 6 cases are not in")
    assert "the cache /c: 'Brats18_TCIA02_0_1', 'Brats18_TCIA02_1_1', 'Brats18_TCIA02_2_1' and 2 more" in message
    assert "another dataset" not in message
    _write(path, B20[:2])  # a BraTS 2020 list against a BraTS 2018 cache
    with pytest.raises(JaxbratsError, match=r"2 of its 2 cases .* \(a list of another dataset, or another cache\?\)"):
        read_split_file(path, B18)
    _write(path, ["Brats18_2013_1_1"])  # a prefix of no id: never taken for Brats18_2013_15_1
    with pytest.raises(JaxbratsError, match="'Brats18_2013_1_1'"):
        read_split_file(path, B18)


@pytest.mark.parametrize(
    "lines, error",
    [
        (["Brats18_2013_5_1", "HGG/Brats18_2013_5_1"], "case 'Brats18_2013_5_1' listed twice"),
        (["Brats18_2013_5_1,Brats18_CBICA_AAA_1"], "names several cases: Brats18_2013_5_1, Brats18_CBICA_AAA_1"),
        (["", "# nothing"], "lists no cases"),
    ],
    ids=["duplicate", "ambiguous", "empty"],
)
def test_bad_lists(tmp_path, lines, error):
    path = _write(tmp_path / "list.txt", lines)
    with pytest.raises(JaxbratsError, match=error) as info:
        read_split_file(path, B18)
    assert str(path) in str(info.value)
    with pytest.raises(JaxbratsError, match="split file not found"):
        read_split_file(tmp_path / "nope.txt", B18)


def test_a_case_in_two_lists_and_the_counts(tmp_path):
    files = {
        "train": str(_write(tmp_path / "train.txt", B18[:3])),
        "val": "",
        "test": str(_write(tmp_path / "test.txt", B18[2:])),
    }
    with pytest.raises(
        JaxbratsError, match=r"data.test_split \(.*test.txt\) and data.train_split \(.*train.txt\) both"
    ):
        read_split_files(files, B18, keys=KEYS, cache="the cache")
    _write(tmp_path / "test.txt", B18[3:])
    splits = read_split_files(files, B18, keys=KEYS, cache="the cache")
    assert splits == {"train": B18[:3], "val": [], "test": B18[3:]}
    check_split_counts(splits, (), keys=KEYS, files=files)  # no counts: no check
    check_split_counts(splits, (3, 0, 2), keys=KEYS, files=files)
    with pytest.raises(
        JaxbratsError, match=r"data.train_split \(.*train.txt\) lists 3 cases, the paper's split has 4 "
    ):
        check_split_counts(splits, (4, 0, 2), keys=KEYS, files=files)
    with pytest.raises(JaxbratsError, match="data.val_split is not set, the paper's split has 1 validation cases"):
        check_split_counts(splits, (3, 1, 2), keys=KEYS, files=files)
    check_split_total(5, (3, 0, 2), cache="the cache")
    with pytest.raises(JaxbratsError, match="split the 4 cases of the cache /c, the paper's split has 5"):
        check_split_total(4, (3, 0, 2), cache="the cache /c")


#: The shipped configs whose paper has a split: its counts, and whether it comes from list files.
PAPER_SPLITS = {
    "baseline_brats2018.toml": ((199, 29, 57), "files"),
    "m3ae_brats2018.toml": ((199, 29, 57), "files"),
    "mind_the_gap_brats2018.toml": ((200, 28, 57), "files"),
    "rirn_brats2018.toml": ((190, 0, 95), "ratio"),
    "baseline_brats2020.toml": ((219, 50, 100), "files"),
    "m3ae_brats2020.toml": ((219, 50, 100), "files"),
    "acdis_brats2020.toml": ((219, 50, 100), "files"),
    "rirn_brats2020.toml": ((246, 0, 123), "ratio"),
}


@pytest.mark.parametrize("name", sorted(PAPER_SPLITS))
def test_paper_configs_check_their_split(tmp_path, name):
    counts, kind = PAPER_SPLITS[name]
    ids = [f"Brats18_TCIA01_{i}_1" for i in range(sum(counts))]
    config = load_config(CONFIGS / name)
    assert (config.data.split_counts, config.data.split) == (counts, kind)
    if kind == "ratio":  # the seeded 2:1 split gives exactly the counts; a case fewer is refused
        splits = resolve_splits(config, ids)
        assert tuple(len(splits[k]) for k in ("train", "val", "test")) == counts
        with pytest.raises(JaxbratsError, match=f"split the {len(ids) - 1} cases of the cache /c, the paper's"):
            resolve_splits(config, ids[1:], "/c")
        return
    bounds = [0, counts[0], counts[0] + counts[1], sum(counts)]
    overrides = []
    for i, part in enumerate(("train", "val", "test")):
        # The train list one case short the second time round: the paper's count is checked.
        path = _write(tmp_path / f"{part}.txt", [f"HGG/{c}" for c in ids[bounds[i] : bounds[i + 1]]])
        overrides.append(f"data.{part}_split='{path}'")
    splits = resolve_splits(load_config(CONFIGS / name, overrides), ids)
    assert [splits[k] for k in ("train", "val", "test")] == [ids[bounds[i] : bounds[i + 1]] for i in range(3)]
    _write(tmp_path / "train.txt", ids[1 : counts[0]])
    message = (
        f"data.train_split ({tmp_path / 'train.txt'}) lists {counts[0] - 1} cases, the paper's split has {counts[0]}"
    )
    with pytest.raises(JaxbratsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_splits(load_config(CONFIGS / name, overrides), ids)


@pytest.mark.parametrize(
    "value, error",
    [("[199, 29]", "must be \\[\\] or \\[train, val, test\\]"), ("[0, 1, 1]", "training"), ("[5, -1, 1]", ">= 0")],
)
def test_split_counts_are_checked_in_the_config(value, error):
    with pytest.raises(ConfigError, match=f"data.split_counts.*{error}"):
        load_config(CONFIGS / "baseline_phantom.toml", [f"data.split_counts={value}"])
