"""The study commands end to end on a tiny float64 GPT-NeoX: sweep, compare on a sweep, hvp-error, report."""

import base64
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file, save_file

from pipeline.cli import main
from pipeline_fixtures import assets, write_config

GRID = ["--grid", "hvp.eps=1e-3,1e-5", "--grid", "data.num_batches=1,2"]
# one worker runs the whole module: the studies fixture (a sweep and an hvp-error study) is built once
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shared_ray"), pytest.mark.xdist_group("studies")]
POINTS = ["eps=1e-3_num_batches=1", "eps=1e-3_num_batches=2", "eps=1e-5_num_batches=1", "eps=1e-5_num_batches=2"]


@pytest.fixture(scope="module")
def studies(tmp_path_factory, shared_ray):
    tmp = tmp_path_factory.mktemp("studies")
    model, data = assets(str(tmp))
    out = {"tmp": tmp, "model": model, "data": data}
    out["sweep_config"] = write_config(str(tmp / "sweep.yaml"), model=model, data=data, output_dir=str(tmp / "sweep"),
                                       cluster={"num_groups": 2}, lanczos={"steps": 12, "probes": 2},
                                       blocks={"enabled": True, "probes": 2},
                                       log_to=[f"tensorboard:{tmp / 'sweep_tb'}"])
    assert main(["sweep", out["sweep_config"], *GRID]) == 0
    out["sweep"] = str(tmp / "sweep")
    out["hvp_config"] = write_config(str(tmp / "hvp.yaml"), model=model, data=data, output_dir=str(tmp / "hvp"))
    eps = ",".join(f"{e:.3g}" for e in np.logspace(-9, -1, 25))  # 8 decades, 3 per decade
    assert main(["hvp-error", out["hvp_config"], "--eps", eps]) == 0
    out["hvp_error"] = str(tmp / "hvp" / "hvp-error")
    return out


def test_sweep_runs_every_point_and_indexes_them(studies):
    index = pq.read_table(os.path.join(studies["sweep"], "sweep.parquet")).to_pandas()
    assert index.run.tolist() == POINTS
    assert (index.status == "complete").all()
    assert index["hvp.eps"].tolist() == ["1e-3", "1e-3", "1e-5", "1e-5"]
    assert index["data.num_batches"].tolist() == ["1", "2", "1", "2"]
    for name, eps, batches in zip(POINTS, index["hvp.eps"], index["data.num_batches"]):
        info = json.load(open(os.path.join(studies["sweep"], name, "run.json")))
        assert info["status"] == "complete"
        assert info["config"]["hvp"]["eps"] == float(eps) and info["config"]["data"]["num_batches"] == int(batches)
        assert info["eps"] == float(eps)
        assert os.path.exists(os.path.join(studies["sweep"], name, "config.yaml"))
    compared = pq.read_table(os.path.join(studies["sweep"], "compare.parquet")).to_pandas()
    assert len(compared) == 4 and compared.distance_to_reference[0] == 0.0


def test_a_sweep_logs_one_step_per_point(studies):
    """log_to: the sweep's key figures, one TensorBoard step per point (the names' numbers repeat, so the index)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(studies["tmp"] / "sweep_tb"), size_guidance={"scalars": 0})
    acc.Reload()
    got = {}
    for e in acc.Scalars("hessian/lambda_max"):
        got.setdefault(e.step, e.value)  # a resumed sweep logs again at the same steps
    expected = [json.load(open(os.path.join(studies["sweep"], n, "run.json")))["summary"]["lambda_max"] for n in POINTS]
    assert sorted(got) == [0, 1, 2, 3]
    assert [got[k] for k in range(4)] == pytest.approx(expected, rel=1e-6)
    assert {"hessian/eps", "hessian/block_diagonal_error", "hessian/hvp_count"} <= set(acc.Tags()["scalars"])


def point_pids(sweep: str, name: str) -> list[tuple[int, ...]]:
    info = json.load(open(os.path.join(sweep, name, "run.json")))
    return [tuple(g["pids"]) for g in info["groups"] if g["event"] == "formed"]


def test_a_sweeps_later_points_run_on_the_groups_of_earlier_ones(studies):
    """Two points at a time (cluster.num_groups=2), one group each: the third and fourth points load their models
    in the two groups the first two formed, in the same worker processes."""
    formed = {name: point_pids(studies["sweep"], name) for name in POINTS}
    assert all(len(groups) == 1 for groups in formed.values()), formed
    assert len({groups[0] for groups in formed.values()}) == 2, formed


def test_a_sweep_point_equals_the_same_run_alone(studies, tmp_path):
    """The point's own config.yaml, run on its own, gives the same alpha/beta (so points are ordinary runs),
    also for a point whose group served an earlier point first (its model and batches loaded over those)."""
    reused = [name for name in POINTS[2:] if point_pids(studies["sweep"], name)[0]
              in {point_pids(studies["sweep"], n)[0] for n in POINTS[:2]}]
    assert POINTS[3] in reused
    point = os.path.join(studies["sweep"], POINTS[3])
    alone = str(tmp_path / "alone")
    assert main(["run", os.path.join(point, "config.yaml"), "--set", f"output_dir={alone}"]) == 0
    a = pq.read_table(os.path.join(point, "lanczos.parquet")).to_pandas().sort_values(["probe_id", "step"])
    b = pq.read_table(os.path.join(alone, "lanczos.parquet")).to_pandas().sort_values(["probe_id", "step"])
    for col in ("alpha", "beta"):
        assert np.linalg.norm(a[col].to_numpy() - b[col].to_numpy()) <= 1e-10 * np.linalg.norm(b[col].to_numpy())


def test_rerunning_a_sweep_resumes_only_what_is_missing(studies, capsys):
    sweep = studies["sweep"]
    kept = {n: os.path.getmtime(os.path.join(sweep, n, "lanczos.parquet")) for n in POINTS}
    shutil.rmtree(os.path.join(sweep, POINTS[2]))
    assert main(["sweep", studies["sweep_config"], *GRID]) == 0
    assert "3 already finished" in capsys.readouterr().err
    for name in POINTS:
        path = os.path.join(sweep, name, "lanczos.parquet")
        assert os.path.exists(path)
        if name != POINTS[2]:
            assert os.path.getmtime(path) == kept[name], name  # finished points were not recomputed
    index = pq.read_table(os.path.join(sweep, "sweep.parquet")).to_pandas()
    assert (index.status == "complete").all()


def test_a_failing_point_is_recorded_and_the_others_finish(studies, tmp_path, capsys):
    broken = str(tmp_path / "broken")
    shutil.copytree(studies["model"], broken)
    weights = os.path.join(broken, "model.safetensors")
    tensors = load_file(weights)
    tensors["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"][0, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    config = write_config(str(tmp_path / "c.yaml"), model=studies["model"], data=studies["data"],
                          output_dir=str(tmp_path / "out"), lanczos={"steps": 5, "probes": 1})
    assert main(["sweep", config, "--grid", f"model.path={studies['model']},{broken}"]) == 1
    err = capsys.readouterr().err
    assert "1 of 2 sweep point(s) failed" in err
    index = pq.read_table(str(tmp_path / "out" / "sweep.parquet")).to_pandas()
    assert index.status.tolist() == ["complete", "failed"]
    assert "nan" in index.error[1]


def test_demo_eps_study_u_shape_and_distances(tmp_path):
    """The issue's acceptance check on the demo model (configs/study-eps.yaml, fewer Lanczos steps): the HVP error
    is U-shaped over 6 decades with its minimum within 3x of the auto eps, and a far-too-small eps moves the
    density farther from the auto-eps density than doubling the analysis set does."""
    preset = os.path.join(os.path.dirname(__file__), "..", "..", "..", "configs", "study-eps.yaml")
    out = str(tmp_path / "eps")
    assert main(["hvp-error", preset, "--set", f"output_dir={out}"]) == 0
    summary = json.load(open(os.path.join(out, "hvp-error", "hvp_error.json")))["summary"]
    assert summary["reference"] == "exact" and summary["decades"] >= 6
    assert 1 / 3 <= summary["min_over_auto"] <= 3
    table = pq.read_table(os.path.join(out, "hvp-error", "hvp_error.parquet")).to_pandas()
    err = table.rel_error_exact.to_numpy()
    assert err[0] > 100 * err.min() and err[-1] > 10 * err.min()
    assert main(["sweep", preset, "--grid", "hvp.eps=auto,1e-6", "--grid", "data.num_batches=2,4", "--set",
                 "lanczos.steps=20", "--set", "lanczos.probes=2", "--set", f"output_dir={out}"]) == 0
    compared = pq.read_table(os.path.join(out, "compare.parquet")).to_pandas()
    distance = dict(zip([os.path.basename(r) for r in compared.run], compared.distance_to_reference))
    assert distance["eps=auto_num_batches=2"] == 0.0
    assert distance["eps=1e-6_num_batches=2"] > 3 * distance["eps=auto_num_batches=4"]


@pytest.mark.parametrize("grid,expected", [
    (["--grid", "hvp.eps"], "expected key=v1,v2"),
    (["--grid", "hvp.eps=1e-3,"], "expected key=v1,v2"),
    (["--grid", "lanczos.reorth=full,sideways"], "lanczos.reorth: 'sideways' is not valid"),
    (["--grid", "lanczos.stepz=1,2"], "unknown config key 'lanczos.stepz'"),
    (["--grid", "cluster.num_groups=1,2"], "cannot vary within a sweep"),
    (["--grid", "hvp.eps=1e-3", "--grid", "hvp.eps=1e-4"], "given twice"),
    ([], "at least one --grid"),
    (["--grid", "hvp.eps=1e-3,1e-4", "--reference", "eps=7"], "not a point of this sweep"),
])
def test_bad_sweeps_exit_2_before_ray_starts(studies, grid, expected, tmp_path, capsys, no_ray):
    config = write_config(str(tmp_path / "c.yaml"), model=studies["model"], data=studies["data"],
                          output_dir=str(tmp_path / "out"))
    assert main(["sweep", config, *grid]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


def test_sweep_points_are_validated_with_their_grid_values_and_keep_no_core_split(studies, tmp_path, capsys):
    from pipeline.studies.sweep import parse_grid, plan

    config = write_config(str(tmp_path / "c.yaml"), model=studies["model"], data=studies["data"],
                          output_dir=str(tmp_path / "out"), hvp={"eps": "auto"})
    # the base alone is invalid (assess=false needs a fixed eps); every point is valid
    _, points, _ = plan(config, ["hvp.assess=false"], parse_grid(["hvp.eps=1e-4,1e-6"]))
    assert [p.config.hvp.eps for p in points] == [1e-4, 1e-6]
    _, other, _ = plan(config, ["hvp.assess=false"], parse_grid(["hvp.eps=1e-4,1e-6"]), parallel=1)
    assert [p.config for p in other] == [p.config for p in points]  # --parallel does not change a point
    assert all(os.path.isabs(p.config.output_dir) for p in points)
    assert main(["sweep", config, "--set", "hvp.assess=false", "--grid", "hvp.eps=1e-4,auto"]) == 2
    assert "sweep point eps=auto" in capsys.readouterr().err


def test_sweep_and_run_do_not_share_a_folder(studies, capsys):
    run = os.path.join(studies["sweep"], POINTS[0])
    config = write_config(os.path.join(str(studies["tmp"]), "over.yaml"), model=studies["model"],
                          data=studies["data"], output_dir=run)
    assert main(["sweep", config, "--grid", "hvp.eps=1e-3,1e-4"]) == 2
    assert "holds a single run" in capsys.readouterr().err
    config = write_config(os.path.join(str(studies["tmp"]), "into.yaml"), model=studies["model"],
                          data=studies["data"], output_dir=studies["sweep"])
    assert main(["run", config]) == 2
    assert "holds a sweep" in capsys.readouterr().err


def test_a_block_only_sweep_finishes_without_a_comparison(studies, tmp_path):
    config = write_config(str(tmp_path / "c.yaml"), model=studies["model"], data=studies["data"],
                          output_dir=str(tmp_path / "out"), lanczos={"probes": 0}, blocks={"enabled": True, "probes": 1})
    assert main(["sweep", config, "--grid", "hvp.eps=1e-3"]) == 0
    assert not os.path.exists(tmp_path / "out" / "compare.parquet")
    assert json.load(open(tmp_path / "out" / "sweep.json"))["failed"] == []


def test_compare_on_a_sweep_takes_only_finished_points(studies, tmp_path, capsys):
    copy = str(tmp_path / "sweep")
    shutil.copytree(studies["sweep"], copy)
    info_path = os.path.join(copy, POINTS[1], "run.json")
    info = json.load(open(info_path))
    info["status"] = "running"
    json.dump(info, open(info_path, "w"))
    assert main(["compare", copy, "--output", str(tmp_path / "cmp")]) == 0
    table = pq.read_table(tmp_path / "cmp" / "compare.parquet").to_pandas()
    assert [os.path.basename(r) for r in table.run] == [POINTS[0]] + POINTS[2:]
    # a folder name found in two compared sweeps is ambiguous
    assert main(["compare", copy, studies["sweep"], "--reference", POINTS[0], "--output", str(tmp_path / "c2")]) == 2
    assert "give its path" in capsys.readouterr().err


def test_compare_a_sweep_folder_against_a_named_point(studies, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", studies["sweep"], "--reference", POINTS[3], "--output", str(out)]) == 0
    table = pq.read_table(out / "compare.parquet").to_pandas()
    assert [os.path.basename(r) for r in table.run] == [POINTS[3]] + POINTS[:3]
    assert table.distance_to_reference[0] == 0.0 and (table.distance_to_reference[1:] > 0).all()
    assert main(["compare", studies["sweep"], "--reference", "nope", "--output", str(out)]) == 2


def test_hvp_error_is_u_shaped_with_its_minimum_near_the_auto_eps(studies):
    table = pq.read_table(os.path.join(studies["hvp_error"], "hvp_error.parquet")).to_pandas()
    info = json.load(open(os.path.join(studies["hvp_error"], "hvp_error.json")))
    err = table.rel_error_exact.to_numpy()
    best = int(np.argmin(err))
    assert 0 < best < len(err) - 1  # an interior minimum: round-off on the left, truncation on the right
    assert err[0] > 100 * err[best] and err[-1] > 100 * err[best]
    s = info["summary"]
    assert s["reference"] == "exact" and s["decades"] >= 6
    assert 1 / 3 <= s["min_over_auto"] <= 3
    assert info["auto_rel_error_exact"] <= 3 * err[best]
    # in the truncation regime the Theorem 3.1 estimate and the measured error agree within a factor of 3
    ratio = table.rel_error_exact.to_numpy()[-1] / table.predicted_rel_error.to_numpy()[-1]
    assert 1 / 3 <= ratio <= 3
    assert os.path.getsize(os.path.join(studies["hvp_error"], "hvp_error.png")) > 10_000


def test_hvp_error_shows_the_forward_u_curve_beside_the_central_one(studies):
    """By default (hvp.scheme central) the study runs forward too, on the same grid and probe: its columns sit
    beside the central ones, its own rule predicts its error within 3x wherever the exact error is above float64
    rounding, and its auto eps is within 3x of its own minimum."""
    table = pq.read_table(os.path.join(studies["hvp_error"], "hvp_error.parquet")).to_pandas()
    info = json.load(open(os.path.join(studies["hvp_error"], "hvp_error.json")))
    assert info["scheme"] == "central" and list(info["schemes"]) == ["central", "forward"]
    forward = info["schemes"]["forward"]
    assert forward["auto"]["scheme"] == "forward" and "forward-difference rule" in forward["auto"]["message"]
    err, predicted = table.forward_rel_error_exact.to_numpy(), table.forward_predicted_rel_error.to_numpy()
    best = int(np.argmin(err))
    assert 0 < best < len(err) - 1 and err[0] > 30 * err[best] and err[-1] > 30 * err[best]
    assert np.all((err / predicted >= 1 / 3) & (err / predicted <= 3)), (err / predicted).round(2)
    assert 1 / 3 <= forward["summary"]["min_over_auto"] <= 3
    assert forward["auto_rel_error_exact"] <= 3 * err[best]
    assert err[best] > 10 * table.rel_error_exact.min()  # O(eps): the forward optimum is worse than the central one


def test_hvp_error_on_a_sharded_group_uses_the_stable_fd_reference(studies, tmp_path):
    config = write_config(str(tmp_path / "c.yaml"), model=studies["model"], data=studies["data"],
                          output_dir=str(tmp_path / "out"), cluster={"num_workers": 2})
    assert main(["hvp-error", config, "--eps", "1e-7,1e-5,1e-3,1e-1"]) == 0
    info = json.load(open(tmp_path / "out" / "hvp-error" / "hvp_error.json"))
    assert "unsharded" in info["exact_unavailable"]
    assert info["summary"]["reference"] == "stable FD pair (estimate)"
    assert info["summary"]["min_eps"] == info["summary"]["stable_eps"]
    table = pq.read_table(tmp_path / "out" / "hvp-error" / "hvp_error.parquet").to_pandas()
    assert table.rel_error_exact.isna().all() and table.rel_error_stable.notna().all()


@pytest.mark.parametrize("eps,expected", [("1e-3,abc", "'abc' is not a number"), ("1e-3,-1", "positive"),
                                          ("1e-3", "two distinct")])
def test_hvp_error_refuses_bad_eps(studies, eps, expected, capsys):
    assert main(["hvp-error", studies["hvp_config"], "--eps", eps]) == 2
    assert expected in capsys.readouterr().err


def test_hvp_error_refuses_an_unknown_scheme(studies, capsys):
    assert main(["hvp-error", studies["hvp_config"], "--schemes", "central,backward"]) == 2
    assert "'backward' is not a scheme" in capsys.readouterr().err


def test_a_block_study_without_slq_prints_and_draws_the_table(studies, tmp_path, capsys):
    config = write_config(str(tmp_path / "c.yaml"), model=studies["model"], data=studies["data"],
                          output_dir=str(tmp_path / "out"), lanczos={"probes": 0},
                          blocks={"enabled": True, "probes": 3})
    assert main(["run", config]) == 0
    out = capsys.readouterr().out
    assert "rel. error" in out and "cosine" in out and "overall" in out and "+-" in out
    assert not os.path.exists(tmp_path / "out" / "lanczos.parquet")
    info = json.load(open(tmp_path / "out" / "run.json"))
    assert "summary" not in info and info["blocks"]["overall"]["rel_error_std"] > 0
    blocks = pq.read_table(tmp_path / "out" / "blocks.parquet").to_pandas()
    assert blocks.probe_id.nunique() == 3
    assert os.path.getsize(tmp_path / "out" / "blocks.png") > 10_000


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links, self.headers, self.pre, self._in = [], [], [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for key in ("src", "href"):
            if key in attrs and tag != "img":
                self.links.append(attrs[key])
        self._in = tag

    def handle_endtag(self, tag):
        self._in = None

    def handle_data(self, data):
        if self._in == "th":
            self.headers.append(data)
        elif self._in == "pre":
            self.pre.append(data)


def _parse(path) -> _Page:
    page = _Page()
    page.feed(open(path, encoding="utf-8").read())
    for src in page.images:  # every figure is embedded: no file or network reference
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not page.links
    return page


def test_report_of_a_sweep_embeds_figures_tables_configs(studies):
    assert main(["report", studies["sweep"]]) == 0
    page = _parse(os.path.join(studies["sweep"], "report.html"))
    # compare.png, then per point density.png and blocks.png
    assert len(page.images) == 1 + 2 * len(POINTS)
    for header in ("hvp.eps", "data.num_batches", "distance_to_reference", "rel_error_mean", "cosine_std"):
        assert header in page.headers
    configs = [p for p in page.pre if "lanczos:" in p]
    assert len(configs) == len(POINTS)


def test_report_of_a_run_a_comparison_and_an_hvp_error_study(studies, tmp_path):
    run = os.path.join(studies["sweep"], POINTS[0])
    assert main(["report", run, "--output", str(tmp_path / "run.html")]) == 0
    assert len(_parse(tmp_path / "run.html").images) == 2
    assert main(["report", studies["hvp_error"]]) == 0
    page = _parse(os.path.join(studies["hvp_error"], "report.html"))
    assert len(page.images) == 1 and "rel_error_exact" in page.headers
    cmp_dir = tmp_path / "cmp"
    assert main(["compare", run, os.path.join(studies["sweep"], POINTS[1]), "--output", str(cmp_dir)]) == 0
    assert main(["report", str(cmp_dir)]) == 0
    assert len(_parse(cmp_dir / "report.html").images) == 1 + 2 * 2
    assert main(["report", str(tmp_path / "empty")]) == 2


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (.ci/run installs Debian's chromium)")
def test_report_renders_in_headless_chromium(studies, tmp_path):
    from PIL import Image

    assert main(["report", studies["sweep"]]) == 0
    shot = tmp_path / "report.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2000", f"--screenshot={shot}",
           "file://" + os.path.abspath(os.path.join(studies["sweep"], "report.html"))]
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    with Image.open(shot) as img:
        assert img.size == (1200, 2000)
        pixels = np.asarray(img.convert("L"), dtype=float)
    # a rendered page with text and plots, not a blank or error page: many dark pixels and varied rows
    assert (pixels < 128).mean() > 0.01
    assert pixels.std(axis=1).mean() > 10
