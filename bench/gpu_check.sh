#!/usr/bin/env bash
# GPU checks (issues 5 and 8) for an H100-class node with the stack installed (`pip install -e '.[gpu]'`).
# About 8 minutes: the CUDA tests (bf16 / channels_last / torch.compile / bf16 embedding against fp32 CPU),
# pretraining throughput + MFU + data-wait at 224 px, then the archive benchmark with GPU embedding.
# Each step runs under its own time limit and the next one runs whatever the last gave; the numbers land
# in ${XMODAL_GPU_OUT:-gpu_check_out}/ (JSON and logs).
set -uo pipefail
cd "$(dirname "$0")/.."
export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
out=${XMODAL_GPU_OUT:-gpu_check_out}
mkdir -p "$out"
py=${PYTHON:-python3}
$py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script measures GPUs')" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$py -c "import torch, timm, ray, faiss; print('torch', torch.__version__, 'timm', timm.__version__, 'ray', ray.__version__, 'faiss', faiss.__version__, 'faiss GPUs', faiss.get_num_gpus())"

steps=" ${XMODAL_GPU_STEPS:-cuda_tests train scale} "  # a subset reruns only those
step() {  # step NAME SECONDS CMD...: run under a limit, log to $out/NAME.log, report the exit status
    local name=$1 limit=$2
    shift 2
    [[ $steps == *" $name "* ]] || return 0
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "[gpu_check] $name: exit $? in $((SECONDS - t0)) s (log $out/$name.log)"
    tail -n 4 "$out/$name.log"
}

step cuda_tests 150 $py -m pytest -q -p no:cacheprovider tests/models/test_model_cuda.py
step train 200 $py bench/bench_gpu_train.py --n 16384 --repeat 4 --epochs 2 --out "$out/gpu_train.json"
step scale 200 $py bench/bench_scale.py --work /tmp/xmodal_gpu_scale --particles 100000 --scale 1000000 ${XMODAL_SCALE_ARGS:-}
cp /tmp/xmodal_gpu_scale/bench_scale.json "$out/gpu_scale.json" 2>/dev/null || true
