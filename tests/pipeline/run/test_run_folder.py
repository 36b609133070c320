"""The run folder as a typed store (pipeline.run.run_folder): no other module names its files; run.json round-trips
through RunInfo; finished tasks recorded as parts read back with the tables, and compacted into tables equal to
the ones written whole; a folder as the earlier code left it (tables, no parts) reads back the same."""

import ast
import json
import os
import pathlib

import numpy as np
import pyarrow.parquet as pq
import pytest

from hessian_core import ritz_rule
from hessian_core.quadrature import block_densities, rules_from_columns, summarize
from pipeline.run import run_folder
from pipeline.run.run_folder import (APPROXIMATIONS, BLOCK_RITZ, BLOCKS, LANCZOS, PARTS, RITZ, BlockSpectrum, RunFolder,
                                     RunInfo, TableWriter)
from pipeline.run.tables import LANCZOS_SCHEMA, RITZ_SCHEMA, write_json, write_table

ROOT = pathlib.Path(__file__).resolve().parents[3]
PACKAGES = ("pipeline", "actors", "hessian_core")
FILE_NAMES = {run_folder.RUN_JSON, run_folder.LANCZOS, run_folder.RITZ, run_folder.DENSITY, run_folder.BLOCKS,
              run_folder.BLOCK_RITZ, run_folder.DENSITY_PNG, run_folder.BLOCKS_PNG, run_folder.CHECKPOINTS,
              run_folder.PARTS, run_folder.SWEEP_JSON, run_folder.CONFIG_YAML, "probe-", run_folder.EIGENPAIRS,
              run_folder.EIGEN_MASS, run_folder.LANDSCAPE, run_folder.EIGEN_MASS_PNG, run_folder.LANDSCAPE_PNG,
              run_folder.EIGENVECTORS}
# not checked: HVP_ERROR, "hvp-error", is also the study's command name; EIGEN_CHECKPOINTS, "eigen", is also
# run.json's key


def _string_literals(tree: ast.AST) -> list[ast.Constant]:
    """Every str constant but docstrings (prose may name a file; code that opens one needs a literal)."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [n for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_no_module_but_run_folder_names_a_run_folders_files():
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "pipeline" / "run" / "run_folder.py":
                continue
            for node in _string_literals(ast.parse(path.read_text(), str(path))):
                if node.value in FILE_NAMES:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert not offenders, "run-folder file names outside pipeline/run/run_folder.py:\n" + "\n".join(offenders)


def test_run_info_keeps_every_key_it_read():
    data = {"status": "interrupted", "config": {"lanczos": {"probes": 3}}, "eps": 1e-3, "num_params": 10,
            "eps_calibration": {"relative_error": 0.01, "message": "m"}, "signal": "SIGTERM", "error": None,
            "a_key_from_a_later_version": [1, 2], "timing": {"grad_seconds": 0.5}}
    info = RunInfo.from_dict(data)
    assert info.to_dict() == data
    assert (info.status, info.probes, info.block_probes, info.grad_seconds, info.hvp_relative_error) == (
        "interrupted", 3, None, 0.5, 0.01)
    assert RunInfo.from_dict({"config": {"blocks": {"enabled": True, "probes": 2}}}).block_probes == 2


def _probe(pid: int) -> tuple[list[float], list[float]]:
    rng = np.random.default_rng(pid)
    return list(rng.normal(size=5) + 3.0), list(np.abs(rng.normal(size=5)) + 0.1)


def _fill(writer: TableWriter, probes: int) -> None:
    for pid in range(probes):
        writer.add_probe(pid, *_probe(pid))
        writer.add_block_probe({"probe_id": pid, "blocks": ["a", "b"], "rel_error": [0.1 * pid, 0.2],
                                "cosine": [0.9, 0.8], "whole_rel_error": 0.3})
        for block, size in (("a", 4), ("b", 6)):
            rule = ritz_rule(*_probe(10 + pid))
            writer.add_block_spectrum(block, pid, BlockSpectrum(values=rule.values.tolist(),
                                                                weights=rule.weights.tolist(), block_size=size))
        writer.add_approximation_probe(pid, [
            {"probe_id": pid, "approximation": name, "block": block, "rel_error": 0.1 * pid + k, "cosine": 0.5,
             "whole_rel_error": 0.3 + k, "whole_cosine": 0.7} for k, name in enumerate(("block_diagonal", "lowrank_2"))
            for block in ("a", "b")])


def _tables(folder: RunFolder) -> dict:
    return {name: pq.read_table(folder.file(name)) for name in (LANCZOS, RITZ, BLOCKS, BLOCK_RITZ, APPROXIMATIONS)}


def test_parts_read_back_with_the_tables_and_compact_to_the_tables_written_whole(tmp_path, monkeypatch):
    whole = RunFolder(str(tmp_path / "whole"))
    os.makedirs(whole.path)
    monkeypatch.setattr(run_folder, "REWRITE_FACTOR", 0)  # every task rewrites the tables (small runs do)
    _fill(TableWriter(whole, config_json="{}"), probes=3)
    assert not os.path.exists(whole.file(PARTS))

    parted = RunFolder(str(tmp_path / "parted"))
    os.makedirs(parted.path)
    monkeypatch.setattr(run_folder, "REWRITE_FACTOR", 1e12)  # only the first task rewrites: the rest are parts
    writer = TableWriter(parted, config_json="{}")
    _fill(writer, probes=3)
    assert sum(len(parted._parts(table)) for table in (LANCZOS, BLOCKS, BLOCK_RITZ, APPROXIMATIONS)) == 3 * 5 - 1
    assert pq.read_table(parted.file(LANCZOS)).column("probe_id").to_pylist() == [0] * 5  # as a kill leaves it
    # a resume (or show, plot, compare) reads what the parts hold
    assert parted.lanczos_probes() == whole.lanczos_probes() and parted.block_probes() == whole.block_probes()
    assert parted.block_spectra() == whole.block_spectra() and parted.finished_probe_ids() == {0, 1, 2}
    assert parted.approximation_probes() == whole.approximation_probes() and len(whole.approximation_probes()) == 3
    for a, b in zip(parted.ritz_rules(), whole.ritz_rules()):
        np.testing.assert_array_equal(a.values, b.values)
    resumed = TableWriter(parted, config_json="{}")  # a new invocation: appends after the parts it found
    assert resumed.probes == writer.probes
    resumed.compact()
    assert not os.path.exists(parted.file(PARTS))
    for name, table in _tables(parted).items():
        assert table.equals(_tables(whole)[name]), name


def test_a_kill_between_the_rewrite_and_dropping_the_parts_reads_each_row_once(tmp_path, monkeypatch):
    folder = RunFolder(str(tmp_path))
    monkeypatch.setattr(run_folder, "REWRITE_FACTOR", 1e12)
    writer = TableWriter(folder, config_json="{}")
    _fill(writer, probes=2)
    parts = {n: (tmp_path / PARTS / n).read_bytes() for n in os.listdir(tmp_path / PARTS)}
    writer.compact()
    os.makedirs(tmp_path / PARTS)
    for name, data in parts.items():  # the kill came before the parts were deleted
        (tmp_path / PARTS / name).write_bytes(data)
    assert folder.lanczos_probes() == writer.probes and folder.block_probes() == writer.block_probes
    assert folder.block_spectra() == writer.block_spectra
    assert folder.approximation_probes() == writer.approximation_probes


def test_a_part_record_cut_short_by_a_kill_is_never_read_and_the_next_append_follows_the_whole_ones(tmp_path,
                                                                                                   monkeypatch):
    folder = RunFolder(str(tmp_path))
    monkeypatch.setattr(run_folder, "REWRITE_FACTOR", 1e12)
    writer = TableWriter(folder, config_json="{}")
    for pid in range(3):
        writer.add_probe(pid, *_probe(pid))
    log = folder._part_log(LANCZOS)
    whole = os.path.getsize(log)
    writer.add_probe(3, *_probe(3))
    for cut in (whole + 5, os.path.getsize(log) - 1):  # inside the length, inside the stream
        with open(log, "r+b") as f:
            f.truncate(cut)
        assert folder.finished_probe_ids() == {0, 1, 2}
    resumed = TableWriter(folder, config_json="{}")
    assert os.path.getsize(log) == whole and set(resumed.probes) == {0, 1, 2}
    resumed.add_probe(3, *_probe(3))
    assert folder.lanczos_probes() == writer.probes


def test_a_folder_as_the_earlier_code_left_it_reads_back_and_resumes(tmp_path):
    """Tables written whole after each probe, as the code before part logs left a killed run: read back as
    before, and the next task appends to them."""
    folder = RunFolder(str(tmp_path))
    probes = {pid: dict(zip(("alphas", "betas"), _probe(pid))) for pid in range(2)}
    rules = {pid: ritz_rule(p["alphas"], p["betas"]) for pid, p in probes.items()}
    write_table(folder.file(LANCZOS), run_folder._lanczos_columns(probes), schema=LANCZOS_SCHEMA, config_json="{}")
    write_table(folder.file(RITZ), run_folder._ritz_columns(rules), schema=RITZ_SCHEMA, config_json="{}")
    write_json(folder.file(run_folder.RUN_JSON), {"status": "running", "config": {"lanczos": {"probes": 4}}})
    assert folder.lanczos_probes() == probes and folder.finished_probe_ids() == {0, 1}
    assert [r.values.tolist() for r in folder.ritz_rules()] == [r.values.tolist() for r in rules.values()]
    writer = TableWriter(folder, config_json="{}")
    assert writer.probes == probes
    writer.add_probe(2, *_probe(2))
    assert folder.finished_probe_ids() == {0, 1, 2}
    assert folder.info().probes == 4


def test_one_summary_and_one_block_density_for_runs_and_the_api(tmp_path):
    rules = [ritz_rule(*_probe(k)) for k in range(3)]
    table = {"probe_id": [], "value": [], "weight": [], "residual": []}
    for k, r in reversed(list(enumerate(rules))):  # any row order
        table["probe_id"] += [k] * len(r.values)
        table["value"] += r.values[::-1].tolist()
        table["weight"] += r.weights[::-1].tolist()
        table["residual"] += r.residuals[::-1].tolist()
    back = rules_from_columns(table["probe_id"], table["value"], table["weight"], table["residual"])
    for a, b in zip(back, rules):
        np.testing.assert_array_equal(a.values, b.values)
        np.testing.assert_array_equal(a.weights, b.weights)
    s = summarize(rules, dimension=100)
    assert s.lambda_max == max(r.values[-1] for r in rules) and s.probes == 3
    assert s.trace == pytest.approx(np.mean([100 * np.dot(r.weights, r.values) for r in rules]))
    # the block densities integrate to the blocks' shares of the parameters
    grid = np.linspace(-5, 15, 4001)
    dens = block_densities({"a": rules[:2], "b": rules[2:]}, {"a": 1, "b": 3}, grid=grid, sigma=0.2)
    assert np.trapezoid(dens["a"], grid) == pytest.approx(0.25, rel=1e-6)
    assert np.trapezoid(dens["b"], grid) == pytest.approx(0.75, rel=1e-6)


def test_show_reads_a_run_json_with_unknown_keys(tmp_path, capsys):
    from pipeline.cli import main

    write_json(str(tmp_path / "run.json"), {"status": "complete", "num_params": 7, "from_the_future": {"x": 1}})
    assert main(["show", str(tmp_path)]) == 0
    assert "parameters: 7" in capsys.readouterr().out
    assert json.loads((tmp_path / "run.json").read_text())["from_the_future"] == {"x": 1}
