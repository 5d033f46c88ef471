#!/usr/bin/env bash
# One short GPU session (issue #19): the CUDA tests, then the benchmark with every method eager and
# captured (train.cuda_graphs) side by side, in fp32 and in bf16, BERT-base shape, batch 32 × 128.
# About 6 minutes on one H200. Run from the repo root:
#
#   bash scripts/device_check.sh [OUT]          # OUT: where logs and bench outputs go (device-out)
#
# On a machine without the project installed: Python wheels in .whl/ are installed into /tmp/site
# first (hydra, omegaconf, evaluate, …), and .device/site/ (e.g. the MiniLM package's tokenizer
# files) is put on PYTHONPATH. Each step has its own time limit, so one hang does not cost the rest.
set -uo pipefail
OUT=${1:-device-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
[ -d .device/site ] && export PYTHONPATH=$PWD/.device/site${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
  git rev-parse HEAD 2>/dev/null; } 2>&1 | tee "$OUT/machine.txt"

status=0
echo "== CUDA tests (tests/test_step_capture.py, tests/test_cuda.py)"
# shellcheck disable=SC2086  # TESTS is a list of files
timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -m cuda -n "${JOBS:-6}" -rfEs \
    ${TESTS:-tests/test_step_capture.py tests/test_cuda.py} 2>&1 | tee "$OUT/tests.log" || status=1

BENCH=(--device cuda --model bert_base_shape --batch-size 32 --seq-len 128 --sections main --capture
       --steps "${STEPS:-10}" --warmup "${WARMUP:-2}")
for precision in bf16 fp32; do
    echo "== benchmark, $precision, eager and captured"
    methods=${METHODS:-floor,lora,full,adalora,increlora,triadapt}
    [ "$precision" = fp32 ] && methods=${METHODS_FP32:-$methods}
    timeout "${BENCH_TIMEOUT:-240}" python3 -m triadapt.bench "${BENCH[@]}" --methods "$methods" --precision "$precision" \
        --out "$OUT/bench_$precision" 2>&1 | tee "$OUT/bench_$precision.log" || status=1
done
exit $status
