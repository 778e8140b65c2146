#!/usr/bin/env bash
# Everything mlplab claims about GPUs, checked in one go on a machine with a CUDA GPU (about 6 minutes on one H100):
#   1. the test suite's GPU-marked tests;
#   2. one epoch of the default network on real Fashion-MNIST with trainer=gpu (data resident on the GPU), in fp32
#      in bf16-mixed and with trainer.precision=auto (bf16-mixed where the GPU has native bf16), and with
#      trainer=auto (must pick the GPU);
#   3. the speed benchmark on CUDA (batch 128 and 1024, against a bare GPU loop), and the stacked engine's
#      (K = 1, 4, 8, 16, 32 networks one after another against one stack);
#   4. a 2-job parallel sweep sharing one GPU (hydra/launcher=parallel);
#   5. with two GPUs or more: a data-parallel run (trainer=ddp trainer.devices=2, NCCL).
# Prints a short table; everything lands in the results folder.
# Usage: bash benchmarks/gpu_check.sh [results dir]   (FASHION_MNIST_DIR: folder with the four .gz files)
set -uo pipefail
results=${1:-benchmarks/results/gpu_check}
mkdir -p "$results"
results=$(cd "$results" && pwd)
PY=${PYTHON:-python3}
export MLPLAB_DATA_DIR=${MLPLAB_DATA_DIR:-$(mktemp -d)}
system_dir=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
work=$(mktemp -d)
common=("data.system_dir=$system_dir" data.download=false callbacks.progress_bar=null trainer.max_epochs=1)

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$results/gpu.txt"
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
$PY -c "import torch, lightning, torchvision, hydra; print('torch', torch.__version__, 'lightning', lightning.__version__, 'torchvision', torchvision.__version__, 'hydra', hydra.__version__)" | tee -a "$results/gpu.txt"

$PY -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$results/pytest_gpu.log" | tail -3
: > "$results/runs.txt"

run() {  # name, mlplab-train arguments...
  local name=$1; shift
  (cd "$work" && $PY -m mlplab.cli.train "$@" > "$name.log" 2>&1)
  local rc=$?
  echo "$name rc=$rc" >> "$results/runs.txt"
  [ $rc = 0 ] || tail -20 "$work/$name.log" >> "$results/runs.txt"
}
run gpu_fp32 "hydra.run.dir=runs/gpu_fp32" "${common[@]}" trainer=gpu
run gpu_bf16 "hydra.run.dir=runs/gpu_bf16" "${common[@]}" trainer=gpu trainer.precision=bf16-mixed
run gpu_precision_auto "hydra.run.dir=runs/gpu_precision_auto" "${common[@]}" trainer=gpu trainer.precision=auto
run auto "hydra.run.dir=runs/auto" "${common[@]}" trainer=auto
run sweep_2_jobs_1_gpu -m "hydra.sweep.dir=sweeps/two" "${common[@]}" trainer=gpu hydra/launcher=parallel hydra.launcher.n_jobs=2 seed=1,2
if [ "$gpus" -ge 2 ]; then
  run ddp_2_gpus "hydra.run.dir=runs/ddp" "${common[@]}" trainer=ddp trainer.devices=2 trainer.accelerator=gpu
fi
for metrics in "$work"/runs/*/metrics.json "$work"/sweeps/two/*/metrics.json; do
  [ -f "$metrics" ] && cp "$metrics" "$results/$(basename "$(dirname "$metrics")" | tr '/=,' '___').metrics.json"
done
$PY benchmarks/speed.py --device cuda --batch-sizes 128 1024 --parts epoch --no-classic --output "$results" \
  > "$results/speed.log" 2>&1
echo "speed rc=$?" >> "$results/runs.txt"
$PY benchmarks/stacked_engine.py --device cuda --ks 1 4 8 16 32 --output "$results" > "$results/stacked.log" 2>&1
echo "stacked_engine rc=$?" >> "$results/runs.txt"

$PY - "$results" <<'PYEOF' | tee "$results/table.txt"
import json, sys
from pathlib import Path
results = Path(sys.argv[1])
rc = dict(line.split(" rc=") for line in (results / "runs.txt").read_text().splitlines() if " rc=" in line)
print(f"{'check':<34} {'exit':<5} {'status':<10} {'test/acc':<9} {'epoch s':<8} {'precision':<10}")
for path in sorted(results.glob("*.metrics.json")):
    m = json.loads(path.read_text())
    name = path.name.removesuffix(".metrics.json")
    print(f"{name[:34]:<34} {'':<5} {m.get('status', '?'):<10} {m.get('test/acc', float('nan')):<9.4f} "
          f"{(m.get('epoch_seconds') or [float('nan')])[0]:<8.2f} {m.get('precision', ''):<10}")
for name, code in rc.items():
    print(f"{name:<34} {code:<5}")
print("GPU tests:", (results / "pytest_gpu.log").read_text().strip().splitlines()[-1])
for path in results.glob("speed-cuda-*.json"):
    for row in json.loads(path.read_text())["epoch"]["table"]:
        if row["contender"] == "mlplab":
            print(f"speed, batch {row['batch_size']}: mlplab / bare GPU loop {row['ratio_to_bare']:.3f} "
                  f"(paired {row.get('paired_ratio_to_bare', float('nan')):.3f})")
PYEOF
