#!/usr/bin/env bash
# spur's CUDA path on a machine with an NVIDIA GPU, in one go (about 4 minutes):
# torch's CUDA backend and the device it sees, `spur bench throughput` on cartpole
# with the actors and the learner on CUDA and with only the learner there, a
# cartpole run trained to its target with the learner on CUDA, and nethack-score's
# throughput where the env bridge's packages are installed.
#
#   scripts/gpu_check.sh [SPUR] [OUT]
#
# SPUR is the binary (default target/release/spur), OUT a folder for what it prints
# (default runs/gpu-check). Run it from the repository root. It stops at the first
# failure: no GPU, or a part that fails on CUDA.
set -euo pipefail
spur=${1:-target/release/spur}
out=${2:-runs/gpu-check}
mkdir -p "$out"

(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true) | tee "$out/gpu.txt"
"$spur" devices --require-gpu | tee "$out/devices.txt"

bench() { # name, then spur bench throughput's arguments
  local name=$1
  shift
  echo "== $name"
  "$spur" bench throughput "$@" 2> "$out/$name.log" | tee "$out/$name.txt"
  # The parts log the device they took: a CUDA run that fell back would say cpu.
  grep -o 'device key=.*' "$out/$name.log" | sort | uniq -c | tee -a "$out/$name.txt"
}
bench cartpole-all-cuda --config configs/cartpole.toml --seconds 5 \
  --set model.device=cuda --set learner.device=cuda --parts env,inference,rollout,learner,end-to-end
bench cartpole-learner-cuda --config configs/cartpole.toml --seconds 5 \
  --set model.device=cpu --set learner.device=cuda --parts learner,end-to-end
bench cartpole-cpu --config configs/cartpole.toml --seconds 5 \
  --set model.device=cpu --set learner.device=cpu --parts learner,end-to-end

echo "== cartpole trained with the learner on cuda"
"$spur" local --config configs/cartpole.toml --set learner.device=cuda --set model.device=cpu \
  --run-dir "$out/cartpole-train" > "$out/cartpole-train.log" 2>&1
tail -n 1 "$out/cartpole-train/metrics.jsonl" | tee "$out/cartpole-train.txt"

if python3 -c 'import nle, spur_bridge' 2> /dev/null; then
  bench nethack-score-cuda --config configs/nethack-score.toml --seconds 8 \
    --set model.device=cuda --set learner.device=cuda --parts inference,learner,end-to-end
else
  echo "== nethack-score: skipped (the env bridge's packages are not installed)" | tee "$out/nethack.txt"
fi
