#!/usr/bin/env bash
# The GPU check (README): every CUDA path of the project run once on one GPU,
# then the GPU benchmark tables, in one command that installs nothing (the machine's own
# PyTorch, >= the lower bound of requirements.txt, and no internet needed); its duration on a
# GPU is in docs/results.md. Each step prints its time; a step that fails is reported and the others
# still run (GPU time is short: one run should show every problem), and the exit status is the
# number of failed steps (a step still running after 400 s is stopped). Everything lands in OUT:
#
#     bash gpu_check.sh [OUT]          # OUT defaults to a new folder under /tmp
set -uo pipefail
cd "$(dirname "$0")"
out="${1:-$(mktemp -d /tmp/gpu_check.XXXX)}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=()
step() { echo "== $* ($(date +%T))"; }
run() { timeout 400 "$@" || { echo "!! failed (exit $?): $*"; failed+=("$*"); }; }

step machine
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU: this check needs one'; \
print(torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(), \
f'{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB')" | tee "$out/machine.txt" || exit 1

step "1/5 the CUDA paths: tests/test_gpu.py"
run python -m pytest -q -m gpu -p no:cacheprovider --junitxml "$out/gpu_tests.xml"

step "2/5 a short synthetic run: two members (bf16 autocast), a distillation, evaluations"
S="--data synthetic --backbone b0 --lr 6e-4 --synthetic-train 64 --synthetic-val 16 --epochs 2"
run python train.py $S --out "$out/m0"
run python train.py $S --seed 1 --out "$out/m1"
run python distill.py $S --teacher "$out"/m{0,1}/last.pt --student-init "$out/m0/last.pt" --epochs 1 \
    --out "$out/emu"
run python evaluate.py "$out"/m{0,1}/last.pt --synthetic-val 16 --precision bf16 --json "$out/de.json"
run python evaluate.py "$out/emu/last.pt" --synthetic-val 16 --method mcd --json "$out/mcd.json"

step "3/5 inference: Table 1 in bf16 (B2, 480x640, batch 1)"
run python bench.py --precision bf16 --json "$out/bench_bf16.json"

step "4/5 training steps at batch 8: folded vs textbook, fp32 and bf16 (eager)"
run python bench.py --train --batch-size 8 --precision bf16 --json "$out/bench_train.json"

step "5/5 EMUFormer compiled, without and with CUDA graphs"
run python bench.py --precision bf16 --compile --rows emuformer --json "$out/bench_compile.json"
run python bench.py --precision bf16 --compile --compile-mode reduce-overhead --rows emuformer \
    --json "$out/bench_cuda_graph.json"

step "done: results in $out"
for f in "${failed[@]}"; do echo "!! failed: $f"; done
exit ${#failed[@]}
