"""Nothing is deleted or written into that ctal did not write (issue 30.3): --fresh/--out of the
ablation and the demo, the ownership check on paths and URIs."""
from __future__ import annotations

import json

import pytest

from ctal import manifest
from ctal.outputs import check_own, own_output

STUDY = ("seeds: [0, 1, 2]\nfractions: [1.0]\nmetric: mae\nbudget: {epochs: 1}\ntuning: fixed\n"
         "baseline: {init: scratch, fusion: ctal, orthogonality_weight: 0.0, fraction: 1.0}\n"
         "questions:\n  fusion:\n    ask: which fusion?\n    vary: {fusion: [ctal, late_concat]}\n")


@pytest.fixture
def victim(tmp_path):
    """Somebody's directory, not a ctal output."""
    d = tmp_path / "victim"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    return d


@pytest.mark.parametrize("argv", [
    ["ablate", "--fresh", "--task", "sentiment"],  # refused for a missing --data: it used to delete first
    ["ablate", "--fresh", "--demo", "--quick"],
    ["ablate", "--task", "sentiment", "--data", "{data}", "--config", "{study}"],
    ["ablate", "--fresh", "--task", "sentiment", "--data", "{data}", "--config", "{study}"],
    ["demo", "--fresh", "--quick"],
    ["demo", "--quick"],
], ids=["ablate-fresh-bad-args", "ablate-fresh-demo", "ablate", "ablate-fresh", "demo-fresh", "demo"])
def test_a_foreign_out_is_never_removed_or_written_into(argv, victim, tmp_path, tiny_data, run_recipe):
    (tmp_path / "study.yaml").write_text(STUDY)
    argv = [a.format(data=tiny_data, study=tmp_path / "study.yaml") for a in argv]
    code, err = run_recipe(*argv, "--out", victim)
    assert code == 2 and "Traceback" not in err, err
    assert sorted(p.name for p in victim.iterdir()) == ["thesis.tex"]
    if "--data" in argv or "--demo" in argv or argv[0] == "demo":
        assert f"--out {victim} is not a ctal output" in err


def test_ownership_by_manifest_on_paths_and_uris(tmp_path, victim):
    check_own(tmp_path / "new", ("demo",))  # absent: fine
    (tmp_path / "empty").mkdir()
    check_own(tmp_path / "empty", ("demo",))
    with pytest.raises(FileExistsError, match=f"--out file://{victim} is not a ctal output"):
        check_own(f"file://{victim}", ("demo",))
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file, not a ctal output directory"):
        check_own(tmp_path / "a-file", ("demo",))
    out = own_output(tmp_path / "demo", "demo")
    (out / "corpus").mkdir()
    assert manifest.read(out)["status"] == "created"
    with pytest.raises(FileExistsError, match=r"is the output of another kind of ctal run \(demo, not ablation\)"):
        check_own(out, ("ablation",))
    own_output(out, "demo", fresh=True)  # ours: --fresh empties it
    assert sorted(p.name for p in out.iterdir()) == [manifest.MANIFEST_FILE]
    with manifest.recorded_run(out, "demo"):  # the first run is not preceded by the placeholder
        pass
    assert "previous" not in json.loads((out / manifest.MANIFEST_FILE).read_text())


def test_bare_commands_say_what_is_missing(run_recipe):
    """Weak items of issue 30: bare `ctal` asked for "arguments"; `ctal tune --resume` resumed "ctal-None"."""
    code, err = run_recipe("cli")
    assert code == 2 and err.startswith("usage: ctal") and err.rstrip().endswith("ctal: error: give a COMMAND"), err
    code, err = run_recipe("tune_finetune", "--resume")
    assert code == 2 and "which sweep? give --name" in err and "None" not in err, err


@pytest.mark.parametrize("recipe, kind", [("demo", "demo"), ("ablate", "ablation")])
def test_a_demo_of_another_size_is_not_reused_as_this_one(recipe, kind, tmp_path, run_recipe):
    """A quick demo's finished stages were reused by a full demo on the same --out, and reported as the
    full size's."""
    from ctal.demo import SIZE_FILE

    out = own_output(tmp_path / "out", kind)
    (out / SIZE_FILE).write_text(json.dumps({"utterances": 1}))  # an earlier run of another size
    code, err = run_recipe(recipe, *(["--demo"] if recipe == "ablate" else []), "--out", out)
    assert code == 2 and "holds a demo of another size" in err and "--fresh" in err, err


def test_a_demo_of_the_same_size_is_reused(tmp_path):
    from ctal.demo import SIZES, check_size

    out = own_output(tmp_path / "out", "demo")
    check_size(out, SIZES["quick"])
    check_size(out, SIZES["quick"])  # its tuples come back from JSON as lists: still the same size
    with pytest.raises(ValueError, match="another size"):
        check_size(out, SIZES["full"])
