"""The report's trust section: the influence folder's evaluation against retraining, shown with
its intervals; without one, one sentence and the commands; an evaluation of another run refused
(given) or ignored (found)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tracin_jax.cli import main
from tracin_jax.errors import InputError
from tracin_jax.explain import run_explain
from tracin_jax.explain import page
from tracin_jax.explain.trust import find_evaluation, trust_section

FAST = dict(k=2, items_per_class=1, n_permutations=100, random_seeds=3, progress=False)
CLASSES = ("NCR/NET", "ED", "ET")


def _run_hash(workdir) -> str:
    from tracin_jax import identity
    from tracin_jax.run import load_run

    return identity.describe(load_run(workdir), [])["run"]


def write_evaluation(out: Path, workdir: Path, influence: Path, *, run_identity: str,
                     name: str | None = None, leave_out: bool = True) -> Path:
    """A small evaluation.json as `tracin-jax evaluate` writes it (one variant, the baseline)."""
    gt = out / "gt"
    gt.mkdir(parents=True)
    (gt / "meta.json").write_text(json.dumps({"run_identity": run_identity,
                                              "workdir": str(workdir)}))
    per_class = {c: {"mean": 0.1 * (n + 1), "ci": [0.01 * (n + 1), 0.2 * (n + 1)],
                     "n_targets": 3} for n, c in enumerate(CLASSES)}
    side = lambda m, ci: {"mean": m, "ci": ci, "n": 2, "per_query": [m, m]}  # noqa: E731
    paired = {"mean": 0.021, "ci": [0.004, 0.038], "n": 2, "wins": 2, "wilcoxon_p": 0.25,
              "per_query": [0.01, 0.03]}
    variant = {"folder": str(influence), "gradient": "dice, head", "loss": "dice",
               "lds": {"mean": 0.234, "ci": [0.111, 0.345], "n_targets": 9,
                       "per_class": per_class, "per_target": [0.2] * 9},
               "vs_baseline": {"mean": 0.067, "ci": [0.012, 0.123]}}
    if leave_out:
        variant["leave_out"] = {"1": {"proponents": side(0.031, [0.021, 0.041]),
                                      "random": side(0.01, [0.0, 0.02]),
                                      "opponents": side(-0.005, [-0.015, 0.005]),
                                      "proponents_minus_random": paired,
                                      "proponents_minus_opponents": paired}}
    ev = {"format": 1, "workdir": str(workdir),
          "ground_truth": {"path": str(gt), "subsets": 6, "fraction": 0.5, "seeds": 1,
                           "noise_ceiling": {"dice": None, "ce": None}},
          "bootstrap": {"over": "subsets", "resamples": 200, "method": "percentile",
                        "level": 0.95},
          "best": name or influence.name,
          "variants": {name or influence.name: variant},
          "baselines": {"baseline-class-voxels": {"loss": "dice",
                                                  "lds": {"mean": 0.167, "ci": [0.0, 0.3]}}},
          "leave_out": {"k": [1], "queries_n": 2} if leave_out else {}}
    (out / "evaluation.json").write_text(json.dumps(ev))
    return out


def test_trust_section_with_numbers(tiny_run, tiny_influence, tmp_path):
    ev = write_evaluation(tmp_path / "eval", tiny_run, tiny_influence,
                          run_identity=_run_hash(tiny_run))
    m = run_explain(tiny_run, tiny_influence, tmp_path / "report", evaluation=ev, **FAST)
    t = m["trust"]
    assert t["checked"] and t["given"] and t["variant"] == tiny_influence.name
    assert t["lds"]["mean"] == 0.234 and t["lds"]["ci"] == [0.111, 0.345]
    assert "per_target" not in t["lds"] and t["lds"]["per_class"]["ET"]["mean"] == pytest.approx(0.3)
    assert t["vs_baseline"] == {"mean": 0.067, "ci": [0.012, 0.123]}
    assert t["baseline"]["name"] == "baseline-class-voxels"
    assert t["leave_out"]["1"]["proponents"] == {"mean": 0.031, "ci": [0.021, 0.041], "n": 2}
    assert t["leave_out"]["1"]["proponents_minus_random"]["wins"] == 2
    assert (t["subsets"], t["seeds"], t["leave_out_queries"]) == (6, 1, 2)
    html = (tmp_path / "report" / "index.html").read_text()
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["trust"] == t
    section = html.split("How far to trust these scores")[1].split("<h2>")[0]
    for text in ("0.234", "[0.111, 0.345]", "[0.02, 0.4]", "0.067 [0.012, 0.123]",
                 "above the baseline", "6 random subsets", "with 1 seed(s)", "0.031 [0.021, 0.041]",
                 "0.021 [0.004, 0.038] (2/2 queries above 0)", "on 2 queries"):
        assert text in section, text
    assert "not been checked" not in html


def test_unchecked_scores_say_so_in_one_sentence(tiny_run, tiny_influence, tmp_path):
    t = trust_section(_load(tiny_run), tiny_influence, tmp_path / "report")
    assert t["checked"] is False
    assert t["commands"][0] == (f"tracin-jax evaluate --workdir {tiny_run} --influence "
                                f"{tiny_influence} --out {tiny_influence.parent / 'evaluation'}")
    assert t["commands"][1].endswith(f"--out {tmp_path / 'report'} --evaluation "
                                     f"{tiny_influence.parent / 'evaluation'}")
    m = {"trust": t, "influence": {"class_names": list(CLASSES)}}
    html = page._trust(m)
    sentence = html.split('<p class="verdict">')[1].split("</p>")[0]
    assert sentence.startswith("These scores have not been checked against retraining")
    assert sentence.count(". ") == 0 and sentence.endswith(".")
    assert page._trust({}) == ""  # metrics of a report written before the section existed


def _load(workdir):
    from tracin_jax.run import load_run

    return load_run(workdir)


def test_evaluation_found_beside_the_run_and_another_runs_ignored(tiny_run, tiny_influence,
                                                                   tmp_path):
    run = _load(tiny_run)
    found = tiny_run / "evaluations-test"  # under the workdir: W/*/*/evaluation.json
    try:
        write_evaluation(found / "e1", tiny_run, tiny_influence, run_identity="another-run")
        assert find_evaluation(run, tiny_influence) is None  # another run's: ignored
        write_evaluation(found / "e2", tiny_run, tiny_influence, run_identity=_run_hash(tiny_run),
                         leave_out=False)
        ev, name = find_evaluation(run, tiny_influence)
        assert Path(ev["_file"]) == (found / "e2" / "evaluation.json").resolve()
        assert name == tiny_influence.name
        t = trust_section(run, tiny_influence)
        assert t["checked"] and not t["given"] and t["leave_out"] is None
        html = page._trust({"trust": t, "influence": {"class_names": list(CLASSES)}})
        assert "No leave-top-k-out for this folder" in html and "found beside the run" in html
    finally:
        shutil.rmtree(found, ignore_errors=True)


def test_evaluation_of_another_run_or_folder_refused(tiny_run, tiny_influence, tmp_path, capsys):
    other = write_evaluation(tmp_path / "other", tiny_run, tiny_influence,
                             run_identity="another-run")
    out = tmp_path / "report"
    rc = main(["explain", "--workdir", str(tiny_run), "--influence", str(tiny_influence),
               "--out", str(out), "--evaluation", str(other)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert f"--evaluation {other} evaluated another run" in err[0]
    assert not out.exists()
    wrong = write_evaluation(tmp_path / "wrong", tiny_run, tmp_path / "elsewhere",
                             run_identity=_run_hash(tiny_run), name="elsewhere")
    with pytest.raises(InputError, match=r"did not score --influence .* \(it scored: elsewhere\)"):
        run_explain(tiny_run, tiny_influence, out, evaluation=wrong, **FAST)
    with pytest.raises(InputError, match="no evaluation.json there"):
        run_explain(tiny_run, tiny_influence, out, evaluation=tmp_path, **FAST)
    assert not out.exists()
