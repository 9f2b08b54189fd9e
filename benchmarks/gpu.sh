#!/usr/bin/env bash
# The GPU figures in one call of the device tool (docs/gpu.md).
#
#   bash benchmarks/gpu.sh fetch   # here: wheels the device lacks into .whl/, Fashion-MNIST into data/
#   bash benchmarks/gpu.sh run     # there: installs .whl/, runs the CUDA benchmarks, logs to $OUT
#   bash benchmarks/gpu.sh run-fit # there, a second call: fit on CUDA, single/module/ddp (NCCL)
#   bash benchmarks/gpu.sh run-pack # there, a third call: packed steps and the Table 2 estimate
#
# The device's python3 holds torch with CUDA, pandas, matplotlib, tqdm, typer and pyyaml but
# not pydantic or platformdirs; nothing can be downloaded there. Both folders are git-ignored:
# name them in the call's carry, ["data", ".whl"] (about 33 MB of the 64 MiB a call may take).
# Ray (a 79 MB wheel) does not fit a call, so the Ray Train paths cannot run there this way.
set -euo pipefail
cd "$(dirname "$0")/.."

fetch() {
  local py=.venv/bin/python
  [ -x "$py" ] || py=python3
  rm -rf .whl && mkdir -p .whl data
  local pkg
  for pkg in pydantic pydantic-core annotated-types typing-inspection platformdirs; do
    "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux_2_28_x86_64 -d .whl \
      "$pkg==$("$py" -m pip show "$pkg" | awk '/^Version/ {print $2}')"
  done
  cp -r "${MODLOSS_DATA_DIR:-../shared/data}/fashion-mnist" data/
  du -sh .whl data
}

setup() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 MODLOSS_DATA_DIR="$PWD/data"
}

run() {
  local out=${OUT:-/tmp/gpu-figures}
  mkdir -p "$out"
  setup
  nvidia-smi -L | tee "$out/gpu.txt"
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" |
    tee -a "$out/gpu.txt"
  # Each step's time limit keeps the whole call inside the tool's 10 minutes per command.
  timeout 240 python3 benchmarks/bench_step.py --device cuda 2>&1 | tee "$out/bench_step.txt"
  timeout 60 python3 benchmarks/bench_loss.py --device cuda 2>&1 | tee "$out/bench_loss.txt"
  timeout 60 python3 benchmarks/bench_loader.py --device cuda 2>&1 | tee "$out/bench_loader.txt"
  timeout 180 python3 benchmarks/bench_distributed.py --quick --device cuda \
    --json "$out/bench_distributed.json" 2>&1 | tee "$out/bench_distributed.txt"
}

# A second call (each command has 10 minutes): fit's one loop and its epoch cost on CUDA.
run_fit() {
  local out=${OUT:-/tmp/gpu-figures}
  mkdir -p "$out"
  setup
  # fit's one loop on CUDA: one device, then module parallel and DDP over NCCL (one rank
  # per GPU the device has), each 1 epoch on 5,000 images; the JSON summaries go to $out.
  local gpus strategy
  gpus=$(nvidia-smi -L | wc -l)
  timeout 120 python3 -m modloss train --model 256-M-4-H --device cuda --epochs 1 --subset 5000 \
    --out "$out/fit-single" 2>&1 | tail -25 | tee "$out/fit_single.txt"
  for strategy in module ddp; do
    timeout 120 python3 -m torch.distributed.run --nproc-per-node "$gpus" -m modloss train \
      --model 256-M-4-H --device cuda --epochs 1 --subset 5000 --strategy "$strategy" \
      --out "$out/fit-$strategy" 2>&1 | tail -25 | tee "$out/fit_$strategy.txt"
  done
  timeout 240 python3 benchmarks/bench_epoch.py --device cuda 2>&1 | tee "$out/bench_epoch.txt"
}

# A third call: packing (issue 11) on CUDA, eager and compiled, and the full Table 2 grid
# estimated from measured epochs of fit and fit_pack.
run_pack() {
  local out=${OUT:-/tmp/gpu-figures}
  mkdir -p "$out"
  setup
  timeout 150 python3 benchmarks/bench_pack.py --device cuda 2>&1 | tee "$out/bench_pack.txt"
  timeout 220 python3 benchmarks/bench_pack.py --device cuda --table2 2>&1 |
    tee "$out/bench_pack_table2.txt"
  # Last: torch.compile is the likeliest to fail on the device's older torch.
  timeout 200 python3 benchmarks/bench_pack.py --device cuda --compile --quick 2>&1 |
    tee "$out/bench_pack_compiled.txt"
}

case "${1:-}" in
  fetch) fetch ;;
  run) run ;;
  run-fit) run_fit ;;
  run-pack) run_pack ;;
  *) echo "usage: bash benchmarks/gpu.sh fetch|run|run-fit|run-pack" >&2; exit 2 ;;
esac
