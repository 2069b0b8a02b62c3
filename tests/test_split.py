import pytest

from liverseg.split import make_split

IDS = [str(i) for i in range(20)]


def test_case_level_split_is_disjoint_and_seeded():
    a = make_split(IDS, ["p1"], seed=3, test_fraction=0.25, val_fraction=0.2)
    b = make_split(IDS, ["p1"], seed=3, test_fraction=0.25, val_fraction=0.2)
    c = make_split(IDS, ["p1"], seed=4, test_fraction=0.25, val_fraction=0.2)
    assert a == b and a["test"] != c["test"]
    sets = [set(a[k]) for k in ("train", "val", "test")]
    assert sum(map(len, sets)) == 20 and len(set.union(*sets)) == 20
    assert len(a["test"]) == 5 and a["predict"] == ["p1"]


def test_kfold_covers_every_non_test_case_once():
    folds = [make_split(IDS, seed=0, test_fraction=0.2, folds=4, fold=f) for f in range(4)]
    test = set(folds[0]["test"])
    assert all(set(f["test"]) == test for f in folds)
    vals = [set(f["val"]) for f in folds]
    assert sum(map(len, vals)) == 16 and set.union(*vals) == set(IDS) - test
    for f in folds:
        assert not set(f["train"]) & set(f["val"])


def test_tiny_datasets_keep_a_training_case():
    s = make_split(["a", "b", "c"], test_fraction=0.25, val_fraction=0.2)
    assert len(s["train"]) == 1 and len(s["val"]) == 1 and len(s["test"]) == 1
    with pytest.raises(ValueError, match="fold"):
        make_split(IDS, folds=2, fold=2)


def test_split_from_checks_reads_verdicts_by_content_and_leaves_failed_cases_out(tmp_path):
    import json

    from liverseg.errors import ConfigError
    from liverseg.ingest import Case, Discovery, write_case_table
    from liverseg.split import split_from_checks

    ids = [f"c{i}" for i in range(8)]
    write_case_table(Discovery([Case(c, f"{c}.nii", f"{c}_l.nii") for c in ids] + [Case("p", "p.nii")], []),
                     tmp_path / "cases.tsv")
    checks = []
    for i, c in enumerate(ids + ["p"]):
        f = tmp_path / f"verdict_{len(ids) - i}.json"  # file names say nothing: the case id is read from the file
        f.write_text(json.dumps({"case": c, "ok": c != "c3", "error": f"case {c}: broken" if c == "c3" else ""}))
        checks.append(str(f))
    sp = split_from_checks(tmp_path / "cases.tsv", checks, tmp_path / "split.json", seed=1, test_fraction=0.25,
                           val_fraction=0.2)
    assert json.loads((tmp_path / "split.json").read_text()) == sp
    assert sp["failed"] == {"c3": "case c3: broken"} and sp["predict"] == ["p"]
    assert sorted(sp["train"] + sp["val"] + sp["test"]) == sorted(set(ids) - {"c3"})
    assert sp == {**make_split(ids, ["p"], 1, 0.25, 0.2, failed={"c3": "case c3: broken"})}
    with pytest.raises(ConfigError, match="no check verdict for case"):
        split_from_checks(tmp_path / "cases.tsv", checks[1:], tmp_path / "s2.json")


def test_split_json_lists_every_fold_whose_val_sets_partition_the_non_test_cases():
    sp = make_split(IDS + ["bad"], seed=3, test_fraction=0.2, folds=3, fold=1, failed={"bad": "unreadable"})
    fc = sp["folds_cases"]
    assert len(fc) == 3
    non_test = set(IDS) - set(sp["test"])  # the failed case is in no list
    vals = [set(f["val"]) for f in fc]
    assert set().union(*vals) == non_test and sum(map(len, vals)) == len(non_test)
    for f in fc:
        assert set(f["train"]) == non_test - set(f["val"])
    # each fold's lists are what make_split gives for that fold: the same test set, the same train/val
    for k in range(3):
        one = make_split(IDS + ["bad"], seed=3, test_fraction=0.2, folds=3, fold=k, failed={"bad": "unreadable"})
        assert one["test"] == sp["test"] and (one["train"], one["val"]) == (fc[k]["train"], fc[k]["val"])
    assert "folds_cases" not in make_split(IDS, seed=3)  # a single split's split.json is unchanged
