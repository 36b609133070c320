"""End to end through Ray on a tiny float64 GPT-NeoX saved as a Hugging Face folder."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from helpers import dense_hessian, make_batches
from pipeline.cli import main
from pipeline.run.tables import CONFIG_METADATA_KEY
from pipeline_fixtures import assets, write_config

LAYOUTS = {"1x1": (1, 1), "2x1": (2, 1), "1x2": (1, 2)}  # groups x workers; 2x1 after 1x1 takes its kept group
# the 2-rank run also computes the top 3 eigenpairs (its eigenvectors saved by 2 ranks, read here by 1)
EIGEN = {"k": 3, "tol": 1e-6, "landscape": {"points_2d": 5}}
# one worker runs the whole module: its runs fixture is built once, on the module's shared Ray
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shared_ray"), pytest.mark.xdist_group("pipeline")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_ray):
    tmp = tmp_path_factory.mktemp("e2e")
    model, data = assets(str(tmp))
    out = {}
    for name, (groups, workers) in LAYOUTS.items():
        config = write_config(str(tmp / f"{name}.yaml"), model=model, data=data, output_dir=str(tmp / name),
                              cluster={"num_groups": groups, "num_workers": workers}, hvp={"eps": "auto"},
                              blocks={"enabled": name == "1x2", "probes": 2}, eigen=EIGEN if name == "1x2" else {})
        assert main(["run", config]) == 0
        out[name] = str(tmp / name)
    # converged extremes: more steps and an eps near the float64 optimum
    config = write_config(str(tmp / "long.yaml"), model=model, data=data, output_dir=str(tmp / "long"),
                          hvp={"eps": 1e-5}, lanczos={"steps": 80, "probes": 1})
    assert main(["run", config]) == 0
    out["long"] = str(tmp / "long")
    out["model"], out["data"] = model, data
    return out


def lanczos_table(run_dir):
    return pq.read_table(os.path.join(run_dir, "lanczos.parquet")).to_pandas().sort_values(["probe_id", "step"])


def test_runs_in_a_process_connected_to_ray_use_it_and_leave_it_running(runs):
    """This module's runs ran in a process the ``shared_ray`` fixture had connected: they used that Ray (their
    groups formed on its node) and left it connected; a cluster.address naming another Ray is refused."""
    import ray

    from pipeline.run.config import ClusterConfig, ConfigError, RunConfig
    from pipeline.run.ray_connection import connect_ray

    assert ray.is_initialized()
    node = ray.get_runtime_context().get_node_id()
    for name in LAYOUTS:
        groups = json.load(open(os.path.join(runs[name], "run.json")))["groups"]
        formed = [g for g in groups if g["event"] == "formed"]
        assert formed and all(set(g["nodes"]) == {node} for g in formed), (name, groups)
    assert connect_ray(RunConfig()) is False  # nothing started, nothing to shut down
    with pytest.raises(ConfigError, match="already connected"):
        connect_ray(RunConfig(cluster=ClusterConfig(address="127.0.0.1:1")))


def test_layouts_give_the_same_alpha_beta_and_the_same_auto_eps(runs):
    reference = lanczos_table(runs["1x1"])
    assert reference.probe_id.nunique() == 2 and len(reference) == 60
    eps = {}
    for name in LAYOUTS:
        info = json.load(open(os.path.join(runs[name], "run.json")))
        eps[name] = info["eps"]
        assert info["eps_calibration"]["source"] == "auto"
        if name != "1x2":  # (which also runs the block analysis) a fresh auto-eps run: every probe step plus
            assert 60 + 1 <= info["timing"]["hvp_count"] <= 60 + 4  # only the calibration's extra HVPs (1-4)
    assert len(set(eps.values())) == 1, eps  # two significant digits: reduction order cannot move it
    for name in ("1x2", "2x1"):
        other = lanczos_table(runs[name])
        for col in ("alpha", "beta"):
            a, b = other[col].to_numpy(), reference[col].to_numpy()
            # reduction-order differences of the gradients, divided by the float64 auto eps (~5e-5) and carried
            # through 30 steps: 2e-10 measured; anything wrong in sharding or in the probes is O(1)
            assert np.linalg.norm(a - b) / np.linalg.norm(b) <= 1e-9, (name, col)


def test_parquet_schemas_and_config_metadata(runs):
    import pyarrow as pa

    expected = {
        "lanczos.parquet": {"probe_id": pa.int32(), "step": pa.int32(), "alpha": pa.float64(), "beta": pa.float64()},
        "ritz.parquet": {"probe_id": pa.int32(), "value": pa.float64(), "weight": pa.float64()},
        "density.parquet": {"value": pa.float64(), "density": pa.float64()},
        "blocks.parquet": {"probe_id": pa.int32(), "block": pa.string(), "rel_error": pa.float64(),
                           "cosine": pa.float64(), "whole_rel_error": pa.float64()},
    }
    run_dir = runs["1x2"]
    info = json.load(open(os.path.join(run_dir, "run.json")))
    for name, columns in expected.items():
        schema = pq.read_schema(os.path.join(run_dir, name))
        for col, tp in columns.items():
            assert schema.field(col).type == tp, (name, col)
        assert json.loads(schema.metadata[CONFIG_METADATA_KEY]) == info["config"]
    ritz = pq.read_table(os.path.join(run_dir, "ritz.parquet")).to_pandas()
    assert np.allclose(ritz.groupby("probe_id").weight.sum(), 1.0, atol=1e-12)
    density = pq.read_table(os.path.join(run_dir, "density.parquet")).to_pandas()
    assert (density.density >= 0).all()
    assert abs(np.trapezoid(density.density, density.value) - 1) < 1e-9
    blocks = pq.read_table(os.path.join(run_dir, "blocks.parquet")).to_pandas()
    assert set(blocks.block) == {"gpt_neox.embed_in", "gpt_neox.layers.0", "gpt_neox.final_layer_norm", "lm_head"}


def test_run_json_records_status_summary_and_timing(runs):
    info = json.load(open(os.path.join(runs["2x1"], "run.json")))
    assert info["status"] == "complete" and info["num_params"] == 1128 and info["eps"] == info["eps_calibration"]["eps"] > 0
    assert set(info["versions"]) == {"python", "torch", "transformers", "ray"}
    assert set(info["summary"]) >= {"lambda_max", "lambda_min", "trace", "trace_stderr"}
    t = info["timing"]
    assert t["grad_seconds"] > 0 and t["hvp_seconds"] > 0 and t["lanczos_step_seconds"] > 0
    assert t["hvp_count"] >= 60 and t["total_seconds"] > 0


@pytest.fixture(scope="module")
def dense(runs):
    """(model, analysis batches, dense Hessian, its eigenvalues ascending, eigenvectors as columns) of the runs'
    model and data."""
    from hessian_core.models import ModelSpec, load_model

    model = load_model(ModelSpec(path=runs["model"], dtype="float64"))
    batches = list(make_batches(num_batches=1, batch_size=8, seed=7)[0].reshape(2, 4, -1))
    hessian = dense_hessian(model, batches)
    values, vectors = torch.linalg.eigh(hessian)
    return model, batches, hessian, values, vectors


def test_ritz_extremes_match_the_dense_hessian(runs, dense):
    eigenvalues = dense[3]
    summary = json.load(open(os.path.join(runs["long"], "run.json")))["summary"]
    assert abs(summary["lambda_max"] - float(eigenvalues[-1])) <= 1e-6 * abs(float(eigenvalues[-1]))
    assert abs(summary["lambda_min"] - float(eigenvalues[0])) <= 1e-4 * abs(float(eigenvalues[0]))


def test_plots_are_png_and_plot_show_commands_work(runs, capsys):
    from PIL import Image

    run_dir = runs["1x2"]
    plots = ("density.png", "blocks.png", "eigen_mass.png", "landscape.png")
    for name in plots:
        path = os.path.join(run_dir, name)
        os.unlink(path)
    assert main(["plot", run_dir]) == 0
    for name in plots:
        with Image.open(os.path.join(run_dir, name)) as img:
            assert img.format == "PNG" and img.size[0] > 300
    assert main(["show", run_dir]) == 0
    out = capsys.readouterr().out
    assert "lambda_max" in out and "whole block-diagonal approximation" in out


def test_parquet_readable_by_ray_data(runs):
    import ray

    ds = ray.data.read_parquet(os.path.join(runs["1x1"], "lanczos.parquet"))  # on the module's shared Ray
    assert ds.count() == 60


def test_nan_in_the_weights_fails_the_run_naming_probe_and_step(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from pipeline_fixtures import assets

    model, data = assets(str(tmp_path))
    weights = os.path.join(model, "model.safetensors")
    tensors = load_file(weights)
    tensors["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"][0, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    config = write_config(str(tmp_path / "nan.yaml"), model=model, data=data, output_dir=str(tmp_path / "out"))
    assert main(["run", config]) == 1
    err = capsys.readouterr().err
    assert "probe 0" in err and "step 0" in err and "nan" in err
    info = json.load(open(tmp_path / "out" / "run.json"))
    assert info["status"] == "failed" and "probe 0" in info["error"]
    # a model's NaN is an error of the task, not a lost node: not retried, no probe moved
    assert info["probes_moved"] == 0 and not [g for g in info["groups"] if g["event"] == "lost"]
    assert "was lost" not in err and "failed (" not in err


def test_compare_runs(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", runs["1x1"], runs["2x1"], runs["long"], "--output", str(out)]) == 0
    table = pq.read_table(out / "compare.parquet").to_pandas()
    assert len(table) == 3
    assert table.distance_to_reference[0] == 0.0
    assert table.distance_to_reference[1] <= 1e-9  # 2x1 computed the same alpha/beta as 1x1
    assert 0 < table.distance_to_reference[2] < 1  # 80 steps and 1 probe: another estimate of the same spectrum
    from PIL import Image

    with Image.open(out / "compare.png") as img:
        assert img.format == "PNG"
    assert "distance_to_reference" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "nothing")]) == 2


def _saved_eigenvectors(run_dir: str, model) -> np.ndarray:
    """The run's saved eigenvectors, read whole with dcp.load, as the rows of a matrix."""
    import torch.distributed.checkpoint as dcp

    from hessian_core.eigen_checkpoint import saved_eigenvector_count

    folder = os.path.join(run_dir, "eigenvectors")
    count = saved_eigenvector_count(folder)
    target = {f"eigenvector_{i}": {n: torch.empty_like(p) for n, p in model.named_parameters()} for i in range(count)}
    dcp.load(target, checkpoint_id=folder, no_dist=True)
    return torch.stack([torch.cat([t.reshape(-1) for t in target[f"eigenvector_{i}"].values()])
                        for i in range(count)]).numpy()


def test_compare_of_two_checkpoints_prints_their_eigenvector_overlap_and_angles_and_the_report_shows_them(
        runs, dense, tmp_path, capsys):
    """A later checkpoint (the runs' model after 3 SGD steps on its analysis data) gets its top 3 eigenpairs; compare
    against the 2-rank run reads both saved sets one tensor at a time and gives the overlap |<u_i, u'_j>| and the
    principal angles that the whole vectors give (1e-12); a run against itself gives the identity."""
    from hessian_core.models import ModelSpec, load_model

    model, batches = dense[0], dense[1]
    later = load_model(ModelSpec(path=runs["model"], dtype="float64"))
    optimizer = torch.optim.SGD(later.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        sum(later(input_ids=b, labels=b).loss for b in batches).backward()
        optimizer.step()
    later.save_pretrained(str(tmp_path / "later-model"))
    config = write_config(str(tmp_path / "later.yaml"), model=str(tmp_path / "later-model"), data=runs["data"],
                          output_dir=str(tmp_path / "later"), lanczos={"steps": 6, "probes": 1},
                          eigen={"k": 3, "tol": 1e-6})
    assert main(["run", config]) == 0
    capsys.readouterr()
    out = tmp_path / "cmp"
    assert main(["compare", runs["1x2"], str(tmp_path / "later"), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "eigenvector overlap" in printed and "principal angles (degrees)" in printed

    overlap = pq.read_table(out / "eigen_overlap.parquet").to_pandas()
    angles = pq.read_table(out / "principal_angles.parquet").to_pandas()
    first, second = _saved_eigenvectors(runs["1x2"], model), _saved_eigenvectors(str(tmp_path / "later"), model)
    runs_compared = list(dict.fromkeys(overlap.run))  # the reference itself first, then the later checkpoint
    assert len(runs_compared) == 2
    for run, vectors in zip(runs_compared, (first, second)):
        got = overlap[overlap.run == run].pivot(index="i", columns="j", values="overlap").to_numpy()
        cross = first @ vectors.T
        assert np.allclose(got, np.abs(cross), rtol=0, atol=1e-12)
        cosines = np.clip(np.linalg.svd(cross, compute_uv=False), 0, 1)  # both sets orthonormal (to 1e-12)
        assert np.allclose(angles[angles.run == run].cosine.to_numpy(), cosines, rtol=0, atol=1e-10)
    itself = overlap[overlap.run == runs_compared[0]].pivot(index="i", columns="j", values="overlap").to_numpy()
    assert np.allclose(itself, np.eye(3), atol=1e-10)
    assert np.all(angles[angles.run == runs_compared[0]].angle_degrees.to_numpy() < 1e-3)
    later_angles = angles[angles.run == runs_compared[1]].angle_degrees.to_numpy()
    assert later_angles.max() > 1e-3  # training moved the top subspace (else the check above is vacuous)

    assert main(["report", str(out)]) == 0
    report = (out / "report.html").read_text()
    assert "Eigenvector subspaces against the reference" in report and "angle_degrees" in report


def test_a_fixed_eps_without_assessment_costs_exactly_the_slq_hvps(tmp_path):
    model, data = assets(str(tmp_path))
    config = write_config(str(tmp_path / "c.yaml"), model=model, data=data, output_dir=str(tmp_path / "out"),
                          hvp={"eps": 1e-4, "assess": False}, lanczos={"steps": 6, "probes": 2})
    assert main(["run", config]) == 0
    info = json.load(open(tmp_path / "out" / "run.json"))
    assert info["eps"] == 1e-4 and "not assessed" in info["eps_calibration"]["message"]
    assert info["eps_calibration"]["reliable"] is None
    assert info["timing"]["hvp_count"] == 2 * 6
    assert info["timing"]["grad_seconds"] > 0




def test_the_eigen_task_writes_pairs_vectors_mass_and_landscape_that_match_the_dense_hessian(runs, dense):
    """The 2-rank run's top 3 eigenpairs (FD operator at the auto eps) against the dense float64 Hessian: the
    eigenvalues to 1e-6 of |lambda|max within their bars, the eigenvectors read at world size 1 with dcp.load
    (saved by the 2 ranks), the mass, the gradient fraction and the 1-D landscape's curvature at 0."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.func import functional_call

    from hessian_core import causal_lm_loss

    model, batches, hessian, values, vectors = dense
    run_dir = runs["1x2"]
    info = json.load(open(os.path.join(run_dir, "run.json")))
    eigen = info["eigen"]
    assert (eigen["k"], eigen["which"], eigen["converged"], eigen["stopped"]) == (3, "LA", 3, "converged")
    assert eigen["hvps"] > 0 and eigen["restarts"] >= 1 and eigen["vectors"] == "eigenvectors"
    assert not os.path.exists(os.path.join(run_dir, "checkpoints"))
    pairs = pq.read_table(os.path.join(run_dir, "eigenpairs.parquet")).to_pandas().sort_values("index")
    assert list(pairs.columns) == ["index", "eigenvalue", "residual", "fd_bound", "error", "converged",
                                   "rayleigh_eps", "rayleigh_2eps"]
    top = values.numpy()[::-1][:3].copy()
    scale = float(values.abs().max())
    error = np.abs(pairs.eigenvalue.to_numpy() - top)
    assert np.max(error) <= 1e-6 * scale
    assert np.all(error <= pairs.error.to_numpy())  # each bar covers its eigenvalue's true error
    assert pairs.converged.all() and (pairs.residual <= 1e-6 * scale).all()

    # the eigenvectors the 2 ranks saved, read by one process into a model-shaped mapping per eigenvector
    target = {f"eigenvector_{i}": {n: torch.empty_like(p) for n, p in model.named_parameters()} for i in range(3)}
    with warnings.catch_warnings():  # that it reads in one process, which it is asked to
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(target, checkpoint_id=os.path.join(run_dir, "eigenvectors"), no_dist=True)
    u = torch.stack([torch.cat([t.reshape(-1) for t in target[f"eigenvector_{i}"].values()]) for i in range(3)])
    assert torch.allclose(u @ u.T, torch.eye(3, dtype=torch.float64), atol=1e-12)
    # Davis-Kahan: 1 - |cos| <= (residual / gap)^2 + the FD operator's own tilt; the gap of each of the top 3 to
    # the rest of the spectrum is stated here (>= 1e3 x tol x |lambda|max)
    gaps = [float(np.min(np.abs(np.delete(values.numpy(), -1 - i) - top[i]))) for i in range(3)]
    assert min(gaps) >= 1e3 * 1e-6 * scale  # measured: 0.70, 0.44, 0.44, and |lambda|max = 4.52
    cosines = (u @ vectors[:, [-1, -2, -3]]).diagonal().abs()
    assert float(cosines.min()) >= 1 - 1e-6

    # eigen mass: each eigenvector's squared mass per tensor, read off the saved vectors themselves
    mass = pq.read_table(os.path.join(run_dir, "eigen_mass.parquet")).to_pandas()
    assert np.allclose(mass.groupby("eigenvector").mass.sum(), 1.0, atol=1e-12)
    for i in range(3):
        rows = mass[mass.eigenvector == i].set_index("tensor").mass
        for name, t in target[f"eigenvector_{i}"].items():
            assert abs(rows[name] - float(t.pow(2).sum())) <= 1e-12
    assert set(mass.block) == {"gpt_neox.embed_in", "gpt_neox.layers.0", "gpt_neox.final_layer_norm", "lm_head"}

    # the gradient fraction: |U^T g|^2 / |g|^2 with the dense gradient and the saved (orthonormal) eigenvectors
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    loss = sum(causal_lm_loss(lambda **kw: functional_call(model, params, args=(), kwargs=kw), b)
               for b in batches) / len(batches)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(params.values()))])
    expected = float((u @ g).pow(2).sum() / g.pow(2).sum())
    assert abs(eigen["gradient_fraction"] - expected) <= 1e-8

    # the 1-D landscape along u_1: its second difference at t = 0 is lambda_1 within the grid's truncation
    # bound, h^2/12 x |L''''| (the five central points' fourth difference, x2 for its variation over [-2h, 2h])
    # plus the round-off 4 eps_mach |L(0)| / h^2; the line is the saved u_1, whose curvature u^T H u is
    # lambda_1 to (1 - cos^2) x the spread of the spectrum
    land = pq.read_table(os.path.join(run_dir, "landscape.parquet")).to_pandas()
    one = land[land["slice"] == "1d"].sort_values("t1")
    t, f = one.t1.to_numpy(), one.loss.to_numpy()
    assert len(t) == 21 and t[10] == 0.0 and np.allclose(t, -t[::-1], rtol=0, atol=0)
    assert abs(f[10] - loss.item()) <= 1e-12 * loss.item()
    h = t[11] - t[10]
    second = (f[11] - 2 * f[10] + f[9]) / h ** 2
    fourth = (f[8] - 4 * f[9] + 6 * f[10] - 4 * f[11] + f[12]) / h ** 4
    bound = 2 * h ** 2 / 12 * abs(fourth) + 4 * np.finfo(float).eps * abs(f[10]) / h ** 2
    assert abs(second - top[0]) <= bound  # measured: h = 0.125 (auto range 1.25), 4.407 against 4.515, bound 0.20
    assert eigen["landscape_curvature"] == pytest.approx(second, rel=1e-12)
    assert len(land[land["slice"] == "2d"]) == 25


APPROXIMATIONS = ["block_diagonal", "block_tridiagonal", "lowrank_3", "block_diagonal_plus_lowrank_2", "gauss_newton"]


def test_the_approximation_study_and_slq_on_gauss_newton_match_the_dense_h_and_g(runs, dense, tmp_path, capsys):
    """``blocks.approximations`` on one rank (FD at eps 1e-5, the low-rank pairs solved by the run to 1e-10 x
    |lambda|max, largest in magnitude): every row of approximations.parquet equals its metric from the dense H,
    the dense G and their dense eigenpairs. The same run's SLQ probe ran on G (``lanczos.operator``): its Ritz
    values lie in G's spectrum, the largest G's lambda_max. ``plan`` counts both; ``show`` prints the table."""
    from helpers import dense_gauss_newton, flatten
    from hessian_core import ParamSpace, parameter_blocks, probe_vector
    from pipeline.run.driver import APPROXIMATION_SEED_OFFSET
    from test_approximations import block_diagonal_part, dense_metrics, masks

    model, batches, hessian, values, vectors = dense
    out = tmp_path / "approx"
    config = write_config(str(tmp_path / "approx.yaml"), model=runs["model"], data=runs["data"], output_dir=str(out),
                          hvp={"eps": 1e-5}, lanczos={"operator": "gauss_newton", "probes": 1, "steps": 60},
                          blocks={"probes": 2, "approximations": APPROXIMATIONS},
                          eigen={"tol": 1e-10, "max_hvps": 3000})
    assert main(["plan", config]) == 0
    planned = capsys.readouterr().out
    assert "Gauss-Newton: its restore copy" in planned and "approximation study: 5 eigenvectors" in planned
    assert "Gauss-Newton products: 62" in planned  # 60 SLQ steps and one a study probe
    assert main(["run", config]) == 0
    info = json.load(open(out / "run.json"))
    assert info["status"] == "complete" and info["gauss_newton_products"] == 2 + 60
    assert all(solve["converged"] == solve["k"] for solve in info["approximation_eigen"].values())

    space = ParamSpace(model)
    blocks = parameter_blocks(model, space)
    bm = masks(model, space, blocks)
    gauss_newton = dense_gauss_newton(model, batches)
    diag = block_diagonal_part(hessian, bm)
    r_values, r_vectors = torch.linalg.eigh(hessian - diag)

    def largest(vals, vecs, k):
        order = torch.argsort(vals.abs(), descending=True)
        # the k-th and (k+1)-th magnitudes apart, so the rank-k part is well defined (measured: >= 0.05)
        assert float(vals.abs()[order[k - 1]] - vals.abs()[order[k]]) >= 1e-2
        return vecs[:, order[:k]], vals[order[:k]]

    u, lam = largest(values, vectors, 3)
    w, mu = largest(r_values, r_vectors, 2)
    table = pq.read_table(out / "approximations.parquet").to_pandas()
    assert list(table.columns) == ["probe_id", "approximation", "block", "rel_error", "cosine", "whole_rel_error",
                                   "whole_cosine"]
    assert sorted(set(table.probe_id)) == [0, 1] and list(dict.fromkeys(table.approximation)) == APPROXIMATIONS
    for pid in (0, 1):
        x = flatten(probe_vector(space, seed=APPROXIMATION_SEED_OFFSET, probe_index=pid, kind="gaussian",
                                 dtype=torch.float64))
        h = hessian @ x
        tri = torch.zeros_like(h)
        for k, m in enumerate(bm):
            near = bm[max(k - 1, 0)] | bm[k] | bm[min(k + 1, len(bm) - 1)]
            tri[m] = (hessian @ torch.where(near, x, 0.0))[m]
        want = {"block_diagonal": diag @ x, "block_tridiagonal": tri, "lowrank_3": u @ (lam * (u.T @ x)),
                "block_diagonal_plus_lowrank_2": diag @ x + w @ (mu * (w.T @ x)), "gauss_newton": gauss_newton @ x}
        for name, a in want.items():
            rows = table[(table.probe_id == pid) & (table.approximation == name)]
            assert list(rows.block) == list(blocks)
            rel, cos, whole_rel, whole_cos = dense_metrics(h, a, bm)
            got = np.concatenate([rows.rel_error, rows.cosine, rows.whole_rel_error.iloc[:1], rows.whole_cosine.iloc[:1]])
            assert np.allclose(got, rel + cos + [whole_rel, whole_cos], rtol=0, atol=1e-6), (pid, name)

    study = info["approximations"]
    assert study["order"] == APPROXIMATIONS and study["per_approximation"]["gauss_newton"]["probes"] == 2
    g_values = torch.linalg.eigvalsh(gauss_newton)
    g_max = float(g_values[-1])
    assert float(g_values[0]) >= -1e-10 * g_max  # G is PSD
    ritz = pq.read_table(out / "ritz.parquet").column("value").to_numpy()
    assert ritz.min() >= -1e-8 * g_max and ritz.max() <= g_max * (1 + 1e-8)
    assert abs(info["summary"]["lambda_max"] - g_max) <= 1e-6 * g_max
    assert open(out / "approximations.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "curvature approximations against the exact H v" in shown
    assert all(name in shown for name in APPROXIMATIONS)


def test_auto_steps_and_probes_stop_by_their_rules_and_the_deflated_trace_meets_its_target(runs, dense, tmp_path):
    """``lanczos.steps: auto`` and ``probes: auto`` with the deflated trace task on one rank: every probe stopped
    before the cap (its rule holds at its last step), the probes stopped by the policy's rule (recorded), the
    extremes are the dense ones within their bars, and the trace task's estimate is within 4 standard errors of
    the dense trace with its standard error <= trace.rtol x |trace|."""
    from hessian_core.convergence import ProbeStopRule

    model, batches, hessian, values, vectors = dense
    out = tmp_path / "auto"
    config = write_config(str(tmp_path / "auto.yaml"), model=runs["model"], data=runs["data"], output_dir=str(out),
                          hvp={"eps": 1e-5}, lanczos={"steps": "auto", "probes": "auto", "max_steps": 200,
                                                      "max_probes": 6, "tol": 1e-3},
                          trace={"estimator": "deflated", "sketch": 10, "rtol": 0.05, "max_hvps": 400},
                          density={"tol": 0.01})
    assert main(["run", config]) == 0
    info = json.load(open(out / "run.json"))
    auto = info["probes_auto"]
    table = lanczos_table(str(out))
    assert auto["probes"] == table.probe_id.nunique() >= 2 and auto["stopped"] in ("converged", "max_probes")
    if auto["stopped"] == "converged":
        assert auto["halves_w1"] <= 0.01
    rule = ProbeStopRule(tol=1e-3)
    for pid, rows in table.groupby("probe_id"):
        assert len(rows) < 200 and rule(rows.alpha.tolist(), rows.beta.tolist())  # stopped by the rule, not the cap
        assert not rule(rows.alpha.tolist()[:-1], rows.beta.tolist()[:-1])  # and no later than it held
    s = info["summary"]
    scale = float(values.abs().max())
    assert abs(s["lambda_max"] - float(values[-1])) <= s["lambda_max_residual"] + 1e-7 * scale
    trace = info["trace"]
    exact = float(torch.trace(hessian))
    assert trace["estimator"] == "deflated" and trace["sketch"] == 10
    assert abs(trace["trace"] - exact) <= 4 * trace["stderr"], (trace, exact)
    assert trace["stopped"] == "rtol" and trace["stderr"] <= 0.05 * abs(trace["trace"]) and trace["hvps"] <= 400
    assert pq.read_table(out / "trace.parquet").num_rows == trace["samples"] + 1
