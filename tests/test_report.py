"""The run report: written at the end of a run, self-contained, numbers named by protocol."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

from test_evaluate import make_run, with_model
from test_predict import ECHO_MODEL, ECHO_PLUGIN
from x2ct_framework.evaluation import report
from x2ct_framework.config.recipe import load_recipe
from x2ct_framework.run import main as run_main
from x2ct_framework.training.logbook import Logbook

LINK = re.compile(r"!\[[^\]]*\]\(([^)]+)\)|\]\(([^)]+\.(?:csv|json))\)")


def _links(md: str) -> list[str]:
    return [a or b for a, b in LINK.findall(md)]


def test_a_run_ends_with_a_readable_report(tiny_recipe, tmp_path):
    # a one-parameter model keeps the run short; the report does not depend on the model
    plugin = tmp_path / "echo_plugin.py"
    plugin.write_text(ECHO_PLUGIN)
    text = with_model(tiny_recipe.read_text(), ECHO_MODEL)
    tiny_recipe.write_text(text.replace('seed = 0', f'seed = 0\nplugins = ["{plugin.as_posix()}"]'))
    assert run_main([str(tiny_recipe), "--set", "eval.worst_cases=1", "--set", "eval.bootstrap=100"]) == 0
    run = tmp_path / "runs" / "tiny"
    md = (run / "report.md").read_text()
    for section in ("# Run report: tiny", "## Recipe", "### stage1 (16^3)", "## Final metrics: stage1 best checkpoint",
                    "### Protocol `default`", "### Protocol `x2ctgan`", "Per-structure scores", "## Slice gallery",
                    "## Structures", "## Worst cases by `default/psnr`"):
        assert section in md, section
    assert "| stage1 | 16^3 | 1 | 0.001 -> 1e-06 | l1 x1 | `val/psnr` |" in md
    # the gallery names both of its display windows: the wide one and the soft-tissue one
    assert "wide window [-1000.0, 1500.0]" in md and "soft-tissue window [-160.0, 240.0]" in md
    # every number in the final tables is named <protocol>/<metric> and matches summary.json
    summary = json.loads((run / "eval" / "stage1-test" / "summary.json").read_text())
    for proto, body in summary["protocols"].items():
        for metric, s in body["metrics"].items():
            if s["group"] != "structure" and s["mean"] is not None and s["mean"] == s["mean"]:
                assert (f"| `{proto}/{metric}` | {s['mean']:.4g} |" in md
                        or f"| `{proto}/{metric}` | {s['mean']:.1f} |" in md)
            elif s["group"] != "structure":  # a metric no case could score (for example no std map): n/a
                assert f"| `{proto}/{metric}` | n/a |" in md
    assert "| lung |" in md and "`default/*_dice`" in md
    # the pictures and files it links exist, as PNGs, relative to the run folder
    links = _links(md)
    assert len([lk for lk in links if lk.endswith(".png")]) >= 5
    for link in links:
        path = run / link
        assert path.is_file(), link
        if link.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_can_be_written_again_and_records_a_failed_evaluation(tmp_path, capsys):
    run = make_run(tmp_path, num_test=0)  # no test cases: the final evaluation cannot run
    assert report.main([str(run), "--device", "cpu"]) == 4  # written, but the final evaluation failed
    md = (run / "report.md").read_text()
    assert "# Run report: tiny" in md and "The final evaluation failed" in md and "num_test" in md
    assert "report: the final evaluation failed" in capsys.readouterr().err
    assert report.main([str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_report_plugin_respects_eval_report_false(tmp_path):
    run = make_run(tmp_path)
    recipe = load_recipe(run / "recipe.toml", ["eval.report=false"])
    report.on_run_end(trainer=SimpleNamespace(recipe=recipe, run_dir=run), results={})
    assert not (run / "report.md").exists()


def test_curves_are_drawn_when_the_trainer_did_not(tmp_path):
    rows = [{"kind": "train", "epoch": 1, "step": s, "train/loss": 1.0 / s, "train/l1": 0.5 / s} for s in (1, 2, 3)]
    rows += [{"kind": "val", "epoch": e, "step": 3 * e, "val/psnr": 20.0 + e} for e in (1, 2)]
    book = Logbook(tmp_path / "stage1")  # the report draws from the trainer's own log
    for row in rows:
        book.append(row)
    path = report.plot_curves(book, tmp_path / "c.png", "stage1")
    assert path is not None and path.read_bytes()[:4] == b"\x89PNG"
    assert report.plot_curves(Logbook(tmp_path / "none"), tmp_path / "d.png", "none") is None
    assert Logbook(tmp_path / "missing").rows() == []
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "cut by a cra')
    assert Logbook(tmp_path / "m").rows() == [{"step": 1}]



def test_a_run_whose_final_evaluation_fails_keeps_its_checkpoints_and_exits_4(tiny_recipe, tmp_path, capsys):
    code = run_main([str(tiny_recipe), "--set", "train.trackers=[]", "--set", "data.num_test=0"])
    err = capsys.readouterr().err
    run = tmp_path / "runs" / "tiny"
    assert code == 4
    assert (run / "stage1" / "best" / "model.safetensors").is_file() and (run / "report.md").is_file()
    assert "training finished" in err and "python -m x2ct_framework.evaluation.report" in err and "Traceback" not in err
