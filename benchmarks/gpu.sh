#!/usr/bin/env bash
# Everything a lent CUDA GPU is for, in one run that ends inside ~9 minutes (sized for one H100/H200):
#   the CUDA tests; capsnet_mnist (the paper's CapsNet) and the Conv ShapNet of shapnet_conv_mnist trained in bf16;
#   the explanation-regularizer fine-tune sweep of shapnet_conv_mnist; the GPU rows of the scaling and throughput
#   benchmarks. See benchmarks/gpu_run.py for what each phase does and how the deadline is shared.
#
#   bash benchmarks/gpu.sh [OUT] [gpu_run.py options, e.g. --deadline 480]
#
# OUT (default gpu_out/) receives results.tar.gz and the CapsNet weights in parts; the work folder
# ($GPU_WORK, default OUT/work) holds the runs, so calling the script again resumes where it stopped.
# Needs SHAPNETS_DATA with mnist/. On a machine without CUDA use: python benchmarks/gpu_run.py --work W --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_out}
shift || true
work=${GPU_WORK:-$out/work}
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'benchmarks/gpu.sh needs a CUDA device; on a CPU run: python benchmarks/gpu_run.py --work DIR --dry-run')"
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python3 benchmarks/gpu_run.py --work "$work" --pack "$out" "$@"
