#!/usr/bin/env bash
# The GPU checks, most important first, for a machine with a CUDA GPU where jax (with its CUDA
# plugin), flax, numpy, torch and the test tools are installed: from the repository root,
#   benchmarks/on_gpu.sh OUTDIR
# with `python3` that interpreter (e.g. an activated .venv). CI has no GPU. Each step writes to
# OUTDIR as it goes, so a run cut short keeps what it did.
set -u
out=${1:?usage: benchmarks/on_gpu.sh OUTDIR}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# 1. The test suite on the GPU (JAX's default device there; the torch tests stay on the CPU).
#    -v prints each test's name and outcome as it finishes, so the log names every failure even
#    when the run is stopped before pytest's summary. Workers share the GPU: no preallocation.
XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m pytest -v -n "${WORKERS:-8}" -p no:cacheprovider \
    -rfE --tb=short ${TESTS:-tests} > "$out/tests.log" 2>&1
grep -E "FAILED|ERROR" "$out/tests.log" | sort -u > "$out/tests_failed.txt"
tail -n 3 "$out/tests.log"

# 2. jsample's two control styles side by side (jsample/control.py).
python3 benchmarks/styles.py > "$out/styles.md"

# 3. The tables and the plot of README's "On a GPU" (the torch peers run on CUDA).
python3 -m jsample bench --device gpu --rows 64 --vocab 128256 --dtype f32 --profile peaked \
    --reps 20 --out "$out/gpu" | tail -n 8
python3 -m jsample bench --device gpu --config "top-k 50 + top-p 0.9" --rows 64 \
    --vocab 32000 128256 256000 --dtype f32 --profile peaked --reps 15 \
    --out "$out/gpu_vocab" --plot "$out/plot_gpu.png" | tail -n 5
