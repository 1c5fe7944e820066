"""The ``jsample`` command line: in-process for behaviour, subprocesses for the entry points."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jsample.cli import DEFAULT_PROMPT, main

ROOT = Path(__file__).resolve().parents[1]
# Shapes shared with tests/test_decode.py (3 rows, 64 new bytes), so a worker compiles once.
DEMO = ["demo", "--prompt", "A list is", "--num-samples", "3", "--max-new-tokens", "64"]


@pytest.fixture(autouse=True)
def no_persistent_cache(monkeypatch):
    """In-process runs must not switch this test process to an on-disk compilation cache."""
    monkeypatch.setenv("JSAMPLE_CACHE_DIR", "")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def samples(out):
    chunks = out.split("--- sample ")[1:]
    return [chunk.split(" ---\n", 1)[1] for chunk in chunks]


def test_demo_same_seed_same_text_new_seed_new_text(capsys):
    code, first, err = run(capsys, *DEMO, "--seed", "7", "--temperature", "0.8", "--top-k", "40",
                           "--top-p", "0.9", "--min-p", "0.02", "--top-p-rule", "exclusive")
    assert code == 0 and err == ""
    texts = samples(first)
    assert len(texts) == 3 and all(t.startswith("A list is") for t in texts)
    assert len(set(texts)) == 3, "each sample has its own key"
    assert run(capsys, *DEMO, "--seed", "7", "--temperature", "0.8", "--top-k", "40",
               "--top-p", "0.9", "--min-p", "0.02", "--top-p-rule", "exclusive")[1] == first
    assert run(capsys, *DEMO, "--seed", "8", "--temperature", "0.8", "--top-k", "40",
               "--top-p", "0.9", "--min-p", "0.02", "--top-p-rule", "exclusive")[1] != first


def test_greedy_demo_ignores_the_seed(capsys):
    a = run(capsys, *DEMO, "--temperature", "0", "--seed", "1")[1]
    b = run(capsys, *DEMO, "--temperature", "0", "--seed", "2")[1]
    assert a == b and len(set(samples(a))) == 1


@pytest.mark.parametrize("argv, message", [
    (["demo", "--nope"], "unrecognized arguments: --nope"),
    (["demo", "--top-p", "2"], "argument --top-p: must be a number in [0, 1], got 2.0"),
    (["demo", "--min-p", "nan"], "argument --min-p: must be a number in [0, 1]"),
    (["demo", "--temperature", "-1"], "argument --temperature: must be a finite number >= 0"),
    (["demo", "--temperature", "inf"], "argument --temperature: must be a finite number >= 0"),
    (["demo", "--top-k", "2.5"], "argument --top-k: must be an integer >= 0, got '2.5'"),
    (["demo", "--max-new-tokens", "-5"], "argument --max-new-tokens: must be an integer in"),
    (["demo", "--num-samples", "0"], "argument --num-samples: must be an integer in [1, 1024]"),
    (["demo", "--top-p-rule", "nucleus"], "argument --top-p-rule: invalid choice: 'nucleus'"),
    (["demo", "--prompt", "x" * 500], "--prompt is 500 bytes; the model reads at most 128"),
    (["demo", "--prompt", "\udcff"], "--prompt is not valid UTF-8"),  # an undecodable argv byte
    (["sample"], "invalid choice: 'sample'"),
    ([], "the following arguments are required: command"),
])
def test_bad_input_is_one_line_and_status_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("jsample") and message in err


def test_bench_hands_its_arguments_to_the_benchmark(capsys, monkeypatch):
    import jsample.benchmark

    seen = []
    monkeypatch.setattr(jsample.benchmark, "main", lambda argv: seen.append(argv) or 3)
    assert main(["bench", "--quick", "--vocab", "1000"]) == 3
    assert seen == [["--quick", "--vocab", "1000"]]


def test_bench_runs_the_real_harness(capsys):
    code, out, _ = run(capsys, "bench", "--quick", "--reps", "1", "--config", "greedy", "--impl", "floor", "jsample")
    assert code == 0
    assert "| greedy |" in out and "jsample" in out


def _subprocess(*argv, cache=""):
    env = {**os.environ, "XLA_FLAGS": "", "JSAMPLE_CACHE_DIR": str(cache)}  # one CPU device
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_python_m_jsample_demo_with_defaults(tmp_path):
    """What ``make demo`` runs; it leaves its compiled loop in the cache for the next run."""
    done = _subprocess(sys.executable, "-m", "jsample", "demo", cache=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(DEFAULT_PROMPT) and len(done.stdout) > len(DEFAULT_PROMPT) + 100
    assert any(tmp_path.iterdir())


def test_console_script_reports_bad_input_without_a_traceback():
    script = Path(sys.executable).with_name("jsample")
    if not script.exists():
        pytest.skip("the jsample console script is not installed in this environment")
    done = _subprocess(str(script), "demo", "--top-p", "2")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr == (
        "jsample demo: error: argument --top-p: must be a number in [0, 1], got 2.0\n")
