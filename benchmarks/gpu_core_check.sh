#!/usr/bin/env bash
# GPU checks of the core training path, on a machine with a CUDA GPU:
# the GPU-marked tests, then the default network for the default 10 epochs on real Fashion-MNIST with
# trainer=gpu in fp32 and in bf16-mixed, and trainer=auto picking the GPU. Prints a short table.
# Usage: bash benchmarks/gpu_core_check.sh [results dir]   (FASHION_MNIST_DIR: folder with the four .gz files)
set -uo pipefail
results=${1:-benchmarks/results/gpu_core}
mkdir -p "$results"
PY=${PYTHON:-python3}
export MLPLAB_DATA_DIR=${MLPLAB_DATA_DIR:-$(mktemp -d)}
system_dir=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
work=$(mktemp -d)

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$results/gpu.txt"
$PY -c "import torch, lightning, torchvision, hydra; print('torch', torch.__version__, 'lightning', lightning.__version__, 'torchvision', torchvision.__version__, 'hydra', hydra.__version__)" | tee -a "$results/gpu.txt"

$PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$results/pytest_gpu.log" | tail -3
tests_line=$(tail -1 "$results/pytest_gpu.log")

run() {  # name, overrides...
  local name=$1; shift
  (cd "$work" && $PY -m mlplab.train "hydra.run.dir=runs/$name" "data.system_dir=$system_dir" data.download=false \
      callbacks.progress_bar=null "$@" > "$name.log" 2>&1)
  local rc=$?
  echo "$name rc=$rc $(grep -h 'GPU available' "$work/$name.log" | head -1)" >> "$results/runs.txt"
  [ $rc = 0 ] || tail -20 "$work/$name.log" >> "$results/runs.txt"
  cp "$work/runs/$name/metrics.json" "$results/$name.metrics.json" 2>/dev/null
}
: > "$results/runs.txt"
run gpu_fp32 trainer=gpu
run gpu_bf16 trainer=gpu trainer.precision=bf16-mixed
run auto_1epoch trainer=auto trainer.max_epochs=1

printf '\n%-12s %-9s %-8s %-8s %-7s %-9s %s\n' run status test/acc val/acc epochs wall_s device
for name in gpu_fp32 gpu_bf16 auto_1epoch; do
  $PY - "$results/$name.metrics.json" "$name" "$(grep "^$name rc=" "$results/runs.txt" | cut -d' ' -f3-)" <<'PYEOF'
import json, sys
path, name, device = sys.argv[1:4]
try:
    m = json.load(open(path))
except OSError:
    m = {"status": "no metrics.json"}
print(f"{name:<12} {m.get('status', '?'):<9} {m.get('test/acc', float('nan')):<8.4f} {m.get('val/acc', float('nan')):<8.4f} "
      f"{m.get('epochs', 0):<7} {m.get('wall_seconds', float('nan')):<9.1f} {device}")
PYEOF
done | tee "$results/table.txt"
echo "GPU tests: $tests_line" | tee -a "$results/table.txt"
