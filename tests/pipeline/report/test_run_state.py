"""show, plot, report and compare on runs that did not finish (killed, interrupted), read-only; blocks in model
order; config-file messages (YAML line and column, a directory)."""

import json
import os

import numpy as np

from hessian_core import ritz_rule
from pipeline.cli import main
from pipeline.report.summary import format_summary
from pipeline.studies.compare import compare
from pipeline.run.tables import LANCZOS_SCHEMA, RITZ_SCHEMA, write_json, write_table


def _run_folder(path, *, status, probes_done, probes=4, **extra):
    """A run folder as the recorder leaves it mid-run: run.json and the finished probes' tables, no density."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    lanczos = {"probe_id": [], "step": [], "alpha": [], "beta": []}
    ritz = {"probe_id": [], "value": [], "weight": [], "residual": []}
    for pid in range(probes_done):
        alphas, betas = list(rng.normal(size=6) + 2.0), list(np.abs(rng.normal(size=6)) + 0.1)
        lanczos["probe_id"] += [pid] * 6
        lanczos["step"] += list(range(6))
        lanczos["alpha"] += alphas
        lanczos["beta"] += betas
        rule = ritz_rule(alphas, betas)
        ritz["probe_id"] += [pid] * len(rule.values)
        ritz["value"] += rule.values.tolist()
        ritz["weight"] += rule.weights.tolist()
        ritz["residual"] += rule.residuals.tolist()
    write_table(os.path.join(path, "lanczos.parquet"), lanczos, schema=LANCZOS_SCHEMA, config_json="{}")
    write_table(os.path.join(path, "ritz.parquet"), ritz, schema=RITZ_SCHEMA, config_json="{}")
    write_json(os.path.join(path, "run.json"), {"status": status, "num_params": 1000, "eps": 1e-3,
                                                "config": {"lanczos": {"probes": probes}}, **extra})
    return str(path)


def test_show_plot_report_describe_a_killed_and_an_interrupted_run(tmp_path, capsys):
    killed = _run_folder(tmp_path / "killed", status="running", probes_done=1)
    stopped = _run_folder(tmp_path / "stopped", status="interrupted", signal="SIGTERM", probes_done=2)
    before = sorted(os.listdir(killed))
    assert main(["show", killed]) == 0
    out = capsys.readouterr().out
    assert "status: killed" in out and "1 of 4 probes finished" in out, out
    assert sorted(os.listdir(killed)) == before  # show is read-only
    assert main(["show", stopped]) == 0
    out = capsys.readouterr().out
    assert "interrupted by SIGTERM" in out and "2 of 4 probes finished" in out, out
    assert main(["plot", killed]) == 0  # draws what exists: the finished probe's density
    assert "density.png" in capsys.readouterr().out and os.path.getsize(os.path.join(killed, "density.png")) > 0
    assert main(["report", stopped, "--output", str(tmp_path / "r.html")]) == 0
    page = open(tmp_path / "r.html").read()
    assert "interrupted by SIGTERM" in page and "2 of 4 probes finished" in page


def test_compare_leaves_partial_runs_out_unless_asked(tmp_path, capsys):
    done = _run_folder(tmp_path / "done", status="complete", probes_done=4)
    partial = _run_folder(tmp_path / "partial", status="interrupted", signal="SIGINT", probes_done=1)
    rows = compare([done, partial], out_dir=str(tmp_path / "cmp"))
    assert [os.path.basename(r["run"]) for r in rows] == ["done"]
    err = capsys.readouterr().err
    assert "leaving out" in err and "partial" in err and "1 of 4 probes" in err, err
    rows = compare([done, partial], out_dir=str(tmp_path / "cmp"), include_partial=True)
    assert [os.path.basename(r["run"]) for r in rows] == ["done", "partial"]
    assert main(["compare", partial, "--output", str(tmp_path / "c2")]) == 2


def test_blocks_are_listed_in_model_order(tmp_path):
    row = {"rel_error_mean": 0.5, "rel_error_std": 0.1, "cosine_mean": 0.5, "cosine_std": 0.1}
    overall = {**row, "whole_rel_error_mean": 0.9}
    names = ["model.embed_tokens", "model.layers.2", "model.layers.10", "lm_head"]
    info = {"status": "complete", "blocks": {"overall": overall, "per_block": {n: row for n in sorted(names)},
                                             "order": names}}
    text = format_summary(json.loads(json.dumps(info, sort_keys=True)))  # as run.json stores it: keys sorted
    assert [text.index(n) for n in names] == sorted(text.index(n) for n in names)
    del info["blocks"]["order"]  # a run.json from before: numbers compared as numbers
    text = format_summary(info)
    assert text.index("model.layers.2 ") < text.index("model.layers.10")


def test_config_file_messages(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lanczos:\n  steps: 3\n  probes: 4: 5\n")
    assert main(["run", str(bad)]) == 2
    assert "line 3, column 12" in capsys.readouterr().err
    assert main(["run", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_report_opens_with_the_key_figures(tmp_path):
    summary = {"lambda_max": 4.5, "lambda_max_residual": 3e-6, "lambda_min": -3.1, "lambda_min_residual": 5e-20,
               "trace": 33.2, "trace_stderr": 2.2, "probes": 4}
    run = _run_folder(tmp_path / "done", status="complete", probes_done=4, summary=summary,
                      eps_calibration={"relative_error": 1.1e-7, "message": "fixed"})
    assert main(["plot", run]) == 0  # the CDF panel needs only the Ritz table
    assert main(["report", run, "--output", str(tmp_path / "r.html")]) == 0
    page = open(tmp_path / "r.html").read()
    key = page[page.index('<table class="key">'):]
    key = key[:key.index("</table>")]
    assert page.index('<table class="key">') < page.index("full summary") < page.index("<img")
    for text in ("lambda_max", "4.5", "bound 3e-06", "33.2 +- 2.2", "bulk", "outliers", "negative mass",
                 "estimated HVP relative error 1.1e-07"):
        assert text in key, text
