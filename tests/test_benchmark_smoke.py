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
        assert {"floor", "jsample", "jax", "torch-fast"} <= set(r["times"])
        assert all(t["median_s"] > 0 for t in r["times"].values())
    assert (tmp_path / "p.png").stat().st_size > 0


def test_peaked_logits_are_a_permuted_zipf_profile():
    x = benchmark.make_logits(3, 1000, "peaked")
    assert x.shape == (3, 1000) and x.dtype == np.float32
    assert not np.array_equal(np.argsort(x[0]), np.argsort(x[1]))  # permuted per row
    assert x.max() - np.median(x) > 5  # a few tokens stand far above the rest
