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
#   phantoms, candidate extraction in 16 processes, the classifier on the GPU for
#   $AIDX_GPU_DETECTOR_MINUTES (default 20), exported to ONNX; copies classifier.pt and the log.
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
export AIDX_GPU_DATASET=aidx-data/datasets/phantoms-train-120 AIDX_GPU_MIN_DIAMETER=4.0
if [ "$what" = finetune ]; then
  config=configs/train/phantom-gpu-finetune.yaml
  run=aidx-data/runs/phantom-gpu-finetune
  export AIDX_GPU_DATASET=aidx-data/datasets/phantoms-train-120-from3 AIDX_GPU_MIN_DIAMETER=3.0
fi
if [ "$what" = all ] || [ "$what" = train ] || [ "$what" = finetune ]; then
  start=$(date +%s)
  python3 - <<'PY' 2>&1 | tee "$out/dataset.log"
import os
from pathlib import Path
from training.converters import main_phantoms
main_phantoms(Path(os.environ["AIDX_GPU_DATASET"]), 120, 1, 96, 256, nodules=6,
              diameter_range=(float(os.environ["AIDX_GPU_MIN_DIAMETER"]), 30.0), workers=16)
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
  start=$(date +%s)
  data=aidx-data/datasets/phantoms-train-6001 run=aidx-data/runs/detector-gpu
  python3 -m aidx dataset phantoms "$data" --cases 60 --seed 6001 --nodules 8 \
    --min-diameter 3 --max-diameter 30 --workers 16 2>&1 | tail -1
  for k in $(seq 0 15); do
    OMP_NUM_THREADS=1 python3 -m training.detector extract "$data" "$run" --shard "$k/16" \
      > "$out/extract-$k.log" 2>&1 &
  done
  wait
  echo "extraction: $(( $(date +%s) - start )) s, $(ls "$run/crops" | wc -l) cases"
  python3 -m training.detector train "$run" --minutes "${AIDX_GPU_DETECTOR_MINUTES:-20}" \
    2>&1 | tee "$out/detector-train.log" | tail -3
  cp "$run/classifier.pt" "$run/spec.json" "$out/" || true
  echo "detector total: $(( $(date +%s) - start )) s"
fi
