#!/usr/bin/env bash
# The full-size course and the speed benchmark on a lent GPU machine (issue: "The full-size course on
# a GPU"), in one call. Prepare on a CPU machine first, from the repository's root:
#   1. wheels the GPU machine lacks (diffusers, datasets, papermill, nbval and their missing needs) in
#      .whl/ (ignored), downloaded with `pip download --no-deps --only-binary=:all: --python-version 3.12
#      --platform manylinux2014_x86_64 ... -d .whl NAME==VERSION`;
#   2. the photographs in .data/leeds/ (ignored): cp -r ../shared/data/leeds-butterflies/images .data/leeds
# then run `bash tools/gpu_run.sh` there, carrying .whl and .data. Results go to $OUT (or ./gpu-results).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m ipykernel install --user --name python3 >/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
export PYTHONUNBUFFERED=1
# 1. Speed first (it is what the full run's time depends on): the tutorial's loop against the course's.
python3 benchmarks/train_speed.py --data .data/leeds --batch-sizes 16,64,128 --json "$out/speed.json" 2>&1 | tee "$out/speed.log"
python3 benchmarks/train_speed.py --data .data/leeds --batch-sizes 16,64,128 --compile --channels-last \
  --json "$out/speed_compiled.json" 2>&1 | tee "$out/speed_compiled.log"
# 2. The full-size course: every notebook at its defaults, the photographs as the data, outputs committed.
python3 tools/make_outputs.py --data .data/leeds --preset tutorial \
  --data-label "the 832 photographs of the Leeds Butterfly Dataset (Wang, Markert and Everingham, BMVC 2009) as a local folder" \
  --figure-label "Leeds butterflies" 2>&1 | tee "$out/make_outputs.log"
tar czf "$out/course.tgz" notebooks images runs/ddpm-butterflies-tutorial/samples runs/ddpm-butterflies-tutorial/samplers.csv
