#!/usr/bin/env bash
# Everything for a lent GPU machine in one call (device tool, `carry: [".whl"]`):
#   1. installs the wheels the machine lacks (monai, nibabel, pydantic, pydicom; see
#      docs/models/lung-nodule.md for the download command),
#   2. benchmarks/gpu.py (providers, model time per study, training throughput GPU vs CPU),
#   3. the training set (configs/train/phantom-gpu.yaml: 120 phantoms, 16 processes) and the
#      GPU training run (wall-clock limit in the config),
#   4. copies the log, best.pt and the curves to $OUT (or ./gpu-out without $OUT).
#   finetune: a dataset with nodules from 3 mm, then configs/train/phantom-gpu-finetune.yaml
#   from the carried aidx-data/runs/phantom-cpu-finetune/checkpoint.pt (the network of the
#   default model 0.5.0; carry that path too), with small-nodule sampling and hard negatives.
#   detector: the two-stage detector's classifier (docs/models/lung-nodule.md): 60 training
#   phantoms ($GPU_DETECTOR_CASES), 0.7.0's candidates extracted in 16 processes, the
#   classifier trained on the GPU for $GPU_DETECTOR_MINUTES (default 2) once per axis
#   order of the augmentation ($GPU_DETECTOR_AXES, default "all in-plane"), each exported
#   to $OUT/models/lung-nodule/0.8.N (copied back into aidx-data/models/lung-nodule/, they are
#   judged with `aidx evaluate --model lung-nodule@0.8.N`).
# Usage: bash benchmarks/gpu_session.sh [train|bench|finetune|detector|all]   (default all)
set -uo pipefail
what=${1:-all}
out=${OUT:-gpu-out}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ "$what" = all ] || [ "$what" = bench ]; then
  timeout 150 python3 benchmarks/gpu.py --repeats 5 --train-steps 5 2>&1 | tee "$out/gpu-bench.log"
fi
config=configs/train/phantom-gpu.yaml
run=aidx-data/runs/phantom-gpu
export GPU_DATASET=aidx-data/datasets/phantoms-train-120 GPU_MIN_DIAMETER=4.0
if [ "$what" = finetune ]; then
  config=configs/train/phantom-gpu-finetune.yaml
  run=aidx-data/runs/phantom-gpu-finetune
  export GPU_DATASET=aidx-data/datasets/phantoms-train-120-from3 GPU_MIN_DIAMETER=3.0
fi
if [ "$what" = all ] || [ "$what" = train ] || [ "$what" = finetune ]; then
  start=$(date +%s)
  python3 - <<'PY' 2>&1 | tee "$out/dataset.log"
import os
from pathlib import Path
from training.converters import main_phantoms
main_phantoms(Path(os.environ["GPU_DATASET"]), 120, 1, 96, 256, nodules=6,
              diameter_range=(float(os.environ["GPU_MIN_DIAMETER"]), 30.0), workers=16)
print("dataset ready")
PY
  echo "dataset: $(( $(date +%s) - start )) s"
  python3 -m training.train --config "$config" 2>&1 | tee "$out/train.log" \
    | grep -v "epoch [0-9]*/[0-9]*: loss" || true
  grep "epoch [0-9]*/[0-9]*: loss" "$out/train.log" | tail -3
  cp "$run/best.pt" "$run/curves.png" "$out/" || true
  echo "training total: $(( $(date +%s) - start )) s"
fi
if [ "$what" = detector ]; then
  # One call must stay within the device's 10 minutes: about 1 min of phantoms, 2-3 min of
  # extraction in 16 processes, then each variant's training and export.
  start=$(date +%s)
  cases=${GPU_DETECTOR_CASES:-60} minutes=${GPU_DETECTOR_MINUTES:-2}
  data=aidx-data/datasets/phantoms-train-6001 run=aidx-data/runs/detector-gpu
  python3 -m aidx dataset phantoms "$data" --cases "$cases" --seed 6001 --nodules 8 \
    --min-diameter 3 --max-diameter 30 --workers 16 2>&1 | tail -1
  for k in $(seq 0 15); do
    OMP_NUM_THREADS=1 python3 -m training.detector extract "$data" "$run" --background-mm 13 \
      --shard "$k/16" > "$out/extract-$k.log" 2>&1 &
  done
  wait
  echo "extraction: $(( $(date +%s) - start )) s, $(ls "$run/crops" | wc -l) cases"
  # The augmentation's axis orders (training.detector train --axes), each its own run on the
  # same crops and its own model (0.8.0: all six orders, as 0.7.0; 0.8.1: in-plane only).
  version=0
  for axes in ${GPU_DETECTOR_AXES:-all in-plane}; do
    variant="$run-$axes"
    mkdir -p "$variant" && ln -sfn "$PWD/$run/crops" "$variant/crops"
    cp "$run/spec.json" "$variant/"
    python3 -m training.detector train "$variant" --minutes "$minutes" --axes "$axes" \
      2>&1 | tee "$out/detector-train-$axes.log" | tail -2
    python3 -m training.detector export "$variant" --version "0.8.$version" \
      --root "$out/models" --max-candidates 300 --augment-top 32 2>&1 | tail -1
    cp "$variant/classifier.pt" "$out/classifier-$axes.pt" || true
    version=$((version + 1))
  done
  echo "detector total: $(( $(date +%s) - start )) s"
fi
