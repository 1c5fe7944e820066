"""The benchmark harness runs end to end on a tiny grid, so it cannot rot. No timing is asserted."""

import json

import numpy as np

from jsample import benchmark


def test_quick_run_writes_a_table_for_every_config(tmp_path, capsys):
    out = tmp_path / "bench"
    assert benchmark.main(["--quick", "--reps", "1", "--out", str(out), "--plot", str(tmp_path / "p.png")]) == 0
    table = (tmp_path / "bench.md").read_text()
    for cfg in benchmark.CONFIGS:
        assert f"| {cfg.name} |" in table
    data = json.loads((tmp_path / "bench.json").read_text())
    assert {r["config"] for r in data["results"]} == {c.name for c in benchmark.CONFIGS}
    for r in data["results"]:
        assert {"floor", "jsample", "jsample-rows", "jax", "torch-fast"} <= set(r["times"])
        assert all(t["median_s"] > 0 for t in r["times"].values())
    assert (tmp_path / "p.png").stat().st_size > 0


def test_peaked_logits_are_a_permuted_zipf_profile():
    x = benchmark.make_logits(3, 1000, "peaked")
    assert x.shape == (3, 1000) and x.dtype == np.float32
    assert not np.array_equal(np.argsort(x[0]), np.argsort(x[1]))  # permuted per row
    assert x.max() - np.median(x) > 5  # a few tokens stand far above the rest


def test_per_row_parameters_spread_around_the_configuration():
    cfg = benchmark.Config("top-k 50 + top-p 0.9", temperature=0.7, top_k=50, top_p=0.9)
    p = benchmark.per_row_params(cfg, 64, 64)
    assert len(set(np.asarray(p.top_k).tolist())) > 30  # really per row
    assert np.asarray(p.top_k).min() == 25 and np.asarray(p.top_k).max() == 75
    np.testing.assert_allclose([np.asarray(p.top_p).min(), np.asarray(p.top_p).max()], [0.85, 0.95], atol=1e-6)
    np.testing.assert_allclose(np.asarray(p.temperature).mean(), 0.7, rtol=1e-6)
    assert p.candidates == 128  # the static bound on k that the documentation asks for
    off = benchmark.per_row_params(benchmark.Config("greedy", temperature=0.0), 8, 64)
    assert np.all(np.asarray(off.temperature) == 0) and np.all(np.asarray(off.top_k) == 0)
    assert np.all(np.asarray(off.top_p) == 1) and np.all(np.asarray(off.min_p) == 0)


def test_a_slow_compile_does_not_cut_the_rounds():
    # The round budget goes by a compiled call: jsample compiles for about a second and then
    # runs in microseconds at this size, so it gets every round (it got 3 when the first call,
    # compilation included, set the budget).
    cfg = next(c for c in benchmark.CONFIGS if c.name == "top-k 50 + top-p 0.9")
    times = benchmark.time_cell(cfg, 4, 4096, "f32", "peaked", impls=["floor", "jsample"], reps=4,
                                budget_s=0.5)
    assert times["jsample"]["runs"] == 4 and times["floor"]["runs"] == 4


def test_the_control_styles_script_runs_and_both_styles_agree(capsys):
    # benchmarks/styles.py asserts that both styles draw the same tokens in every configuration.
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "styles.py"
    spec = importlib.util.spec_from_file_location("styles", path)
    styles = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(styles)
    styles.main(["--rows", "2", "--vocab", "1024", "--reps", "1"])
    out = capsys.readouterr().out
    for cfg in benchmark.CONFIGS:
        assert f"| {cfg.name} |" in out and f"| {cfg.name}, per-row |" in out
