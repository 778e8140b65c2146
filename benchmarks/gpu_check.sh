#!/usr/bin/env bash
# Everything mlplab claims about GPUs, checked in one go on a machine with a CUDA GPU and mlplab installed
# (about 7 minutes on one H200):
#   1. one epoch of the default network on real Fashion-MNIST with trainer=gpu in fp32, bf16-mixed and
#      trainer.precision=auto, and with trainer=auto (must pick the GPU); a 2-job parallel sweep on one GPU;
#   2. stacked sweeps (benchmarks/stacked_sweep.py): 16 seeds x 10 epochs stacked against one job of 10 epochs;
#      K = 1, 4, 8, 16, 32 seeds x 2 epochs stacked, and job by job for K = 1, 4, 8;
#   3. the speed benchmark on CUDA (batch 128 and 1024, against a bare GPU loop), and the stacked engine's;
#   4. the test suite's GPU-marked tests (tests/test_gpu.py);
#   5. with two GPUs or more: a data-parallel run (trainer=ddp trainer.devices=2, NCCL).
# Prints a short table; everything lands in the results folder.
# Usage: bash benchmarks/gpu_check.sh [results dir]   (FASHION_MNIST_DIR: folder with the four .gz files)
set -uo pipefail
results=${1:-benchmarks/results/gpu_check}
mkdir -p "$results"
results=$(cd "$results" && pwd)
PY=${PYTHON:-python3}
export MLPLAB_DATA_DIR=${MLPLAB_DATA_DIR:-$(mktemp -d)}
export FASHION_MNIST_DIR=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
system_dir=$FASHION_MNIST_DIR
work=$(mktemp -d)
common=("data.system_dir=$system_dir" data.download=false callbacks.progress_bar=null trainer.max_epochs=1)

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$results/gpu.txt"
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
$PY -c "import torch, lightning, torchvision, hydra; print('torch', torch.__version__, 'lightning', lightning.__version__, 'torchvision', torchvision.__version__, 'hydra', hydra.__version__)" | tee -a "$results/gpu.txt"
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
step() {  # name, command...
  local name=$1; shift
  "$@" > "$results/$name.log" 2>&1
  echo "$name rc=$?" >> "$results/runs.txt"
}
step stacked_sweep_16x10 $PY benchmarks/stacked_sweep.py --device cuda --ks 1 16 --alone-ks 1 --epochs 10 --output "$results"
step stacked_sweep_ks $PY benchmarks/stacked_sweep.py --device cuda --ks 1 4 8 16 32 --alone-ks 1 4 8 --epochs 2 --output "$results"
step speed $PY benchmarks/speed.py --device cuda --batch-sizes 128 1024 --parts epoch --no-classic --repeats 2 --output "$results"
step stacked_engine $PY benchmarks/stacked_engine.py --device cuda --ks 1 4 8 16 32 --output "$results"
step pytest_gpu $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py

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
if (results / "pytest_gpu.log").is_file():
    print("GPU tests:", ((results / "pytest_gpu.log").read_text().strip().splitlines() or ["?"])[-1])
for path in results.glob("speed-cuda-*.json"):
    for row in json.loads(path.read_text())["epoch"]["table"]:
        if row["contender"] == "mlplab":
            print(f"speed, batch {row['batch_size']}: mlplab / bare GPU loop {row['ratio_to_bare']:.3f} "
                  f"(paired {row.get('paired_ratio_to_bare', float('nan')):.3f})")
for path in sorted(results.glob("stacked-sweep-cuda-*.json")):
    data = json.loads(path.read_text())
    for row in data["rows"]:
        alone = row.get("alone", {})
        print(f"stacked sweep, {data['epochs']} epochs, K={row['k']}: stacked {row['stacked']['wall_s']:.1f} s "
              f"({row['stacked']['jobs_per_minute']:.1f} jobs/min), job by job {alone.get('wall_s', float('nan')):.1f} s")
for path in results.glob("stacked-engine-cuda-*.json"):
    for row in json.loads(path.read_text())["rows"]:
        print(f"stacked engine K={row['k']}: stacked / one after another {row['ratio']:.2f}")
PYEOF
