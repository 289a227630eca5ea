#!/usr/bin/env bash
# The GPU rows of benchmarks/bench_pipeline.py on a bare GPU machine without internet, in one
# call of at most ~8 minutes.  Run from the repository root:
#
#     bash benchmarks/gpu/run_gpu.sh
#
# with the wheels of benchmarks/gpu/README.md under benchmarks/gpu/wheels/ (ignored by git; a
# device session carries that folder).  CuPy and numpy/scipy come from the machine's python.
# Writes the table and the log to $OUT (default benchmarks/gpu/out).
set -uo pipefail
HERE=benchmarks/gpu
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/astro_zackay_site}
OUT=${OUT:-$HERE/out}
SIZES=${SIZES:-2048,4096,8192}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
ls "$HERE"/wheels/*.whl >/dev/null 2>&1 || { echo "no wheels in $HERE/wheels (README.md)"; exit 2; }
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$HERE"/wheels/*.whl || exit 3
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import cupy, numpy, scipy, astropy, astro_zackay; print('cupy', cupy.__version__,
'numpy', numpy.__version__, 'scipy', scipy.__version__, 'astropy', astropy.__version__)" \
    || exit 4

# 1. the GPU's results against the CPU's on one 1024^2 pair (|delta Scorr| in sigma)
timeout 120 "$PY" "$HERE/check_equal.py" 2>&1 | tee "$OUT/check_equal.txt"

# 2. the table: numpy rows and cupy rows, same sizes, same process layout
timeout 420 "$PY" benchmarks/bench_pipeline.py --backend cupy --cases sim --no-peers \
    --sizes "$SIZES" --workdir /tmp/bench_pipeline --timeout 240 2>&1 | tee "$OUT/table.txt"
