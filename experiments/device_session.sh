#!/usr/bin/env bash
# One warm GPU lease, many jobs: run from the project root on the device machine, after the SmolLM2 GGUF was
# assembled under /tmp/m and the carried wheels installed into /tmp/site (experiments/reproduce/README.md).
#   start:  mkdir -p /tmp/res && echo start > /tmp/res/running && setsid bash experiments/device_session.sh JOB... </dev/null >/dev/null 2>&1 &
#   watch:  bash experiments/device_session.sh --wait SECONDS   (then tar /tmp/res into $OUT)
# The jobs run one after another from a private copy of the tree (/tmp/proj: the device tool lays the repo copy
# anew on every call), each logging to /tmp/res/JOB.log and its start/end to /tmp/res/progress; a job's results
# land in /tmp/res. A later call of the device tool can wait on them while the machine stays warm.
# Jobs: train_bench, repro (the whole reproduction; finished stages are skipped; options in REPRO_ARGS), repro_more
# (a second pipeline run after it, options in REPRO_MORE_ARGS), repro_train (its training
# stages only), repro_gates (gate training alone, options in GATE_ARGS), bundle (the trained weights in <= 15 MiB
# files under /tmp/res/bundle), unbundle (a working folder rebuilt from such files carried to /tmp/bundle, so
# `repro` goes on with the evaluations), kernels_test, kernels_routed (the GPU tests of the routed kernels alone),
# kernels_k (the GPU tests of test_kernels.py selected by KERNELS_K), layer_bench, layer_tune (writes tune.json,
# keeping its rows of other T; options in TUNE_ARGS),
# layer_bench_tuned (uses that tune.json), tune_decode and tune_decode2 (TUNE_DECODE_ARGS / TUNE_DECODE2_ARGS, into
# $RES/decode_tune / decode_tune2), generate_bench, profile and profile_cmdbuf
# (experiments/profile_decode.py with PROFILE_ARGS; the second also puts XLA's while loops and conditionals into
# CUDA graphs), probe_large_t (experiments/probe_large_t.py with PROBE_ARGS), sweep_layer and sweep_layer2
# (experiments/sweep_layer.py with SWEEP_ARGS / SWEEP2_ARGS, into $RES/sweep / $RES/sweep2), kernels_linear (the GPU
# tests of meteora_linear), probe_expand (experiments/probe_expand.py with PROBE_EXPAND_ARGS), probe_product
# (experiments/probe_product.py with PROBE_PRODUCT_ARGS).
set -u
RES=/tmp/res
if [ "${1:-}" = "--wait" ]; then  # wait until the jobs end or SECONDS pass; print the progress
  end=$(( $(date +%s) + ${2:-540} ))
  while [ -e "$RES/running" ] && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
  cat "$RES/progress"; [ -e "$RES/running" ] && echo "(still running: $(cat "$RES/running"))"
  exit 0
fi
mkdir -p "$RES" && rm -rf /tmp/proj && cp -a . /tmp/proj && rm -rf /tmp/proj/.devcarry/smollm2 && cd /tmp/proj
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:/tmp/proj JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
GGUF=/tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf
CMDBUF=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL
run() {  # run NAME CMD...: log, time and record one job
  local name=$1; shift
  echo "$name" > "$RES/running"
  echo "== $name start $(date +%T)" >> "$RES/progress"
  "$@" > "$RES/$name.log" 2>&1
  echo "== $name rc=$? end $(date +%T)" >> "$RES/progress"
}
for job in "$@"; do
  case $job in
    train_bench) run train_bench python3 experiments/bench_train.py --shapes smollm2 --batch 8 --seq 512 \
                   --strategies gather,dense,fused --out "$RES/train_bench" ;;
    repro_train) run repro_train python3 experiments/reproduce/pipeline.py --work /tmp/repro \
                   --data-from .devcarry/repro/data --base "$GGUF" \
                   --stages data,base,loras,lora_b,convert,gates ${REPRO_ARGS:-} ;;
    repro_gates) run repro_gates python3 experiments/reproduce/pipeline.py --work /tmp/repro \
                   --data-from .devcarry/repro/data --base "$GGUF" --stages gates ${GATE_ARGS:-} ;;
    unbundle) run unbundle bash -c "python3 experiments/reproduce/pipeline.py --work /tmp/repro --stages data,base \
                --data-from .devcarry/repro/data --base $GGUF && python3 experiments/reproduce/bundle.py unpack \
                --bundle /tmp/bundle --work /tmp/repro --base /tmp/repro/base ${UNBUNDLE_ARGS:-}" ;;
    bundle) run bundle python3 experiments/reproduce/bundle.py pack --work /tmp/repro --out "$RES/bundle" ;;
    repro) run repro python3 experiments/reproduce/pipeline.py --work /tmp/repro --data-from .devcarry/repro/data \
             --base "$GGUF" ${REPRO_ARGS:-}
           mkdir -p "$RES/repro_results" && cp -r /tmp/repro/results/. /tmp/repro/commands.jsonl "$RES/repro_results/" ;;
    repro_more) run repro_more python3 experiments/reproduce/pipeline.py --work /tmp/repro \
                  --data-from .devcarry/repro/data --base "$GGUF" ${REPRO_MORE_ARGS:-}
                mkdir -p "$RES/repro_results" && cp -r /tmp/repro/results/. /tmp/repro/commands.jsonl "$RES/repro_results/" ;;
    kernels_test) run kernels_test python3 -m pytest -m gpu tests/test_kernels.py -q -p no:cacheprovider ;;
    layer_bench) run layer_bench python3 experiments/bench_layer.py --out "$RES/layer_bench" ${LAYER_ARGS:-} ;;
    layer_bench_tuned) run layer_bench_tuned python3 experiments/bench_layer.py --out "$RES/layer_bench" \
                         --block-sizes "$RES/layer_bench/tune.json" ${LAYER_ARGS:-} ;;
    layer_tune) run layer_tune python3 experiments/bench_layer.py --tune --out "$RES/layer_bench" ${TUNE_ARGS:-} ;;
    kernels_routed) run kernels_routed python3 -m pytest -m gpu tests/test_kernels.py -q -p no:cacheprovider \
                      -k "routed or split" ;;
    profile) run profile python3 experiments/profile_decode.py --out "$RES/profile.json" ${PROFILE_ARGS:-} ;;
    profile_cmdbuf) run profile_cmdbuf env XLA_FLAGS="${XLA_FLAGS:-} $CMDBUF" python3 experiments/profile_decode.py \
                      --out "$RES/profile_cmdbuf.json" ${PROFILE_ARGS:-} ;;
    tune_decode) run tune_decode python3 experiments/tune_decode.py --out "$RES/decode_tune" ${TUNE_DECODE_ARGS:-} ;;
    tune_decode2) run tune_decode2 python3 experiments/tune_decode.py --out "$RES/decode_tune2" ${TUNE_DECODE2_ARGS:-} ;;
    probe_large_t) run probe_large_t python3 experiments/probe_large_t.py --out "$RES/probe_large_t.json" \
                     ${PROBE_ARGS:-} ;;
    sweep_layer) run sweep_layer python3 experiments/sweep_layer.py --out "$RES/sweep" ${SWEEP_ARGS:-} ;;
    sweep_layer2) run sweep_layer2 python3 experiments/sweep_layer.py --out "$RES/sweep2" ${SWEEP2_ARGS:-} ;;
    kernels_k) run kernels_k python3 -m pytest -m gpu tests/test_kernels.py -q -p no:cacheprovider -k "${KERNELS_K:-routed}" ;;
    kernels_linear) run kernels_linear python3 -m pytest -m gpu tests/test_kernels.py -q -p no:cacheprovider -k linear ;;
    generate_bench) run generate_bench python3 experiments/bench_generate.py --out "$RES/generate_bench" \
                      ${GENERATE_ARGS:-} ;;
    probe_expand) run probe_expand python3 experiments/probe_expand.py --out "$RES/probe_expand" \
                    ${PROBE_EXPAND_ARGS:-} ;;
    probe_product) run probe_product python3 experiments/probe_product.py --out "$RES/probe_product" \
                     ${PROBE_PRODUCT_ARGS:-} ;;
    *) echo "== unknown job $job" >> "$RES/progress" ;;
  esac
done
rm -f "$RES/running"
