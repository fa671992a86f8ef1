#!/usr/bin/env bash
# GPU benchmark in one command (about 6-8 minutes on an H100), from the repository root:
#
#     bash bench/gpu.sh            # a CUDA machine: installs the project, prints the table
#     bash bench/gpu.sh --cpu      # a dry run of every step on the CPU (tiny UNet, 2 steps)
#
# An SD1.5-sized UNet (the real config, random weights) at 512x512, batch 1, bf16, PEFT LoRA
# rank 16 on slider-cn's slider targets: seconds per step and peak memory for (a) LoRA-only,
# (b) LoRA-only with a frozen ControlNet, (c) ControlNet mode, with and without gradient
# checkpointing, for slider-cn's step and a hand-written diffusers + peft loop
# (bench/gpu_step.py; bench/common.py holds both). Then the speed-ups, on (a) without
# checkpointing: channels-last, foreach instead of fused AdamW, no latent cache (VAE and text
# encoder every step), the frozen base stored as fp8 / int8 / nf4 (base_model_precision, cases a
# and b; nf4 on a GPU only), train.py's data path with and without prefetching (case b), and
# torch.compile (last, only while time is left). PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
MODE=gpu
if [[ ${1:-} == --cpu ]]; then
    MODE=cpu
fi
BUDGET_S=${BENCH_BUDGET_S:-480}
OUT=$(mktemp -d)/rows.jsonl
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout, whatever pip manages
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ $MODE == gpu ]]; then
    # Offline machines: without build isolation and dependencies pip needs no index.
    if "$PY" -m pip install -q -e . 2>/dev/null; then
        echo "installed: pip install -e ."
    elif "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null; then
        echo "installed: pip install --no-deps --no-build-isolation -e . (no package index)"
    else
        echo "pip install -e . failed; running from the checkout (PYTHONPATH)"
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    ARGS=(--device cuda --model sd15 --resolution 512 --steps 20 --warmup 5)
    COMPILE=inductor
else
    ARGS=(--device cpu --model tiny --resolution 64 --steps 2 --warmup 2)
    COMPILE=eager  # exercises torch.compile's tracing without a C++ toolchain
fi
"$PY" -c "import torch, diffusers, peft, accelerate; print('torch', torch.__version__, \
'diffusers', diffusers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"

run() {
    "$PY" bench/gpu_step.py "${ARGS[@]}" --precision bf16 --out "$OUT" "$@"
}

echo "== (a) (b) (c), checkpointing off/on, slider-cn and the plain loop  [${SECONDS}s]"
run --cases a,b,c --impl slider,plain --checkpointing off,on
echo "== speed-ups on (a), checkpointing off  [${SECONDS}s]"
run --cases a --checkpointing off --channels-last
run --cases a --checkpointing off --no-fused
run --cases a --checkpointing off --vae-per-step
echo "== base_model_precision on (a) and (b), checkpointing off: peak GiB and s/step  [${SECONDS}s]"
PRECISIONS=(fp8 int8)
if [[ $MODE == gpu ]]; then
    PRECISIONS+=(nf4)
fi
for precision in "${PRECISIONS[@]}"; do
    run --cases a,b --checkpointing off --impl slider --base-precision "$precision" ||
        echo "base_model_precision $precision rows failed"
done
echo "== train.py's data path on (b): conditioning read in the loop / prefetched  [${SECONDS}s]"
run --cases b --checkpointing off --impl slider --data sequential
run --cases b --checkpointing off --impl slider --data prefetch
# torch.compile compiles once per slider strength (+0.5 and -0.5 here): warm-up covers both.
LEFT=$((BUDGET_S - SECONDS - 20))
if ((LEFT > 60)); then
    echo "== torch.compile ($COMPILE) on (a), ${LEFT}s left  [${SECONDS}s]"
    timeout "$LEFT" "$PY" bench/gpu_step.py "${ARGS[@]}" --warmup 6 --precision bf16 \
        --out "$OUT" --cases a --checkpointing off --compile "$COMPILE" ||
        echo "torch.compile rows stopped (time limit or error)"
else
    echo "== torch.compile skipped: ${LEFT}s left"
fi

echo
"$PY" bench/gpu_step.py --table "$OUT"
echo "total ${SECONDS}s"
