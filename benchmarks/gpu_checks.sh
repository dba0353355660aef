#!/usr/bin/env bash
# The builder's CUDA paths in one run (for a lent GPU machine; each part bounded in time):
#   1. LoRA DAPT + depth prune -> KD heal on a random-init Gemma-3-270M-shaped model (benchmarks.adapt_gpu)
#   2. GPTQ and AWQ on a random-init Gemma-3-270M-shaped model (benchmarks.gptq --random-init --device cuda)
# Usage: bash benchmarks/gpu_checks.sh [OUT_DIR]   (OUT_DIR default ./bench/gpu; one log per part)
set -uo pipefail
out=${1:-bench/gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
status=0
timeout 240 python3 -m benchmarks.adapt_gpu --steps 40 --cpu-steps 2 > "$out/adapt_gpu.log" 2>&1 || status=$?
echo "adapt_gpu rc=$status"; tail -n 8 "$out/adapt_gpu.log"
s2=0
timeout 240 python3 -m benchmarks.gptq --random-init --device cuda --out "$out" > "$out/gptq_gpu.log" 2>&1 || s2=$?
echo "gptq_gpu rc=$s2"; tail -n 12 "$out/gptq_gpu.log"
exit $(( status || s2 ))
