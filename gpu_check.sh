#!/usr/bin/env bash
# The GPU check (README "A GPU machine"): every CUDA path of the project run once on one GPU,
# then the GPU benchmark tables, in one command that installs nothing (the machine's own
# PyTorch, >= the lower bound of requirements.txt, and no internet needed). Meant to take under
# 8 minutes on one H100; each step prints its time, and everything lands in OUT:
#
#     bash gpu_check.sh [OUT]          # OUT defaults to a new folder under /tmp
set -euo pipefail
cd "$(dirname "$0")"
out="${1:-$(mktemp -d /tmp/gpu_check.XXXX)}"
mkdir -p "$out"
step() { echo "== $* ($(date +%T))"; }

step machine
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU: this check needs one'; \
print(torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(), \
f'{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB')" | tee "$out/machine.txt"

step "1/4 the CUDA paths: tests/test_gpu.py"
python -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.txt"

step "2/4 a short synthetic run: two members (AMP, one compiled), a distillation, evaluations"
S="--data synthetic --backbone b0 --lr 6e-4 --synthetic-train 64 --synthetic-val 16 --epochs 2"
python train.py $S --compile --out "$out/m0" | tail -3
python train.py $S --seed 1 --out "$out/m1" | tail -3
python distill.py $S --teacher "$out"/m{0,1}/last.pt --student-init "$out/m0/last.pt" --epochs 1 \
    --out "$out/emu" | tail -3
python evaluate.py "$out"/m{0,1}/last.pt --synthetic-images 16 --precision bf16 --json "$out/de.json"
python evaluate.py "$out/emu/last.pt" --synthetic-images 16 --method mcd --json "$out/mcd.json"

step "3/4 inference: Table 1 in bf16 (B2, 480x640, batch 1), then EMUFormer compiled"
python bench.py --precision bf16 --json "$out/bench_bf16.json" | tee "$out/bench_bf16.txt"
python bench.py --precision bf16 --compile --rows emuformer --json "$out/bench_compile.json" \
    | tee "$out/bench_compile.txt"
python bench.py --precision bf16 --compile --compile-mode reduce-overhead --rows emuformer \
    --json "$out/bench_cuda_graph.json" | tee "$out/bench_cuda_graph.txt"

step "4/4 training steps at batch 8: folded vs textbook, fp32 and bf16"
python bench.py --train --batch 8 --precision bf16 --json "$out/bench_train.json" | tee "$out/bench_train.txt"

step "done: results in $out"
