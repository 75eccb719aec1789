#!/usr/bin/env bash
# Issue 6's GPU checks, each step bounded (1595 s in all: STEPS splits them over 10-minute calls):
#   1. the Triton op tests (each launch configuration is tested by itself, so the rest run on the
#      first one, without autotuning);
#   2. `dinat bench` on CUDA, eager: the op at every DiNAT-Mini level against window attention, and
#      dinat_mini's inference and training step against Swin-T's (bfloat16, batch 128);
#   3. the same models compiled with CUDA graphs (--compile reduce-overhead);
#   4. the op against window attention, both compiled with CUDA graphs (the host's launches out);
#   5. dinat_mini's step with CUDA graphs, its whole-window layers run each way (the whole-window
#      Triton kernels, the default, and SDPA, DINAT_WHOLE_WINDOW=sdpa; matmul + softmax was slower:
#      BENCHMARKS.md) beside Swin-T's, profiled; and the op each way at those maps against window
#      attention, compiled alike (benchmarks/cuda_kernels.py);
#   6. the same eagerly (each way's host cost, which CUDA graphs hide), every autotuner configuration
#      of the neighborhood kernels at the undilated levels, and where the eager op's host time goes
#      at 14x14 and 7x7 (cuda_kernels.host_profile).
# Each step has its own time limit, so the later figures come back even if an earlier step runs long
# (NO_LIMITS=1 lifts them, as `make bench-cuda` does). STEPS="tests eager" (say) runs some of them:
# with a fresh install, all six take more than one 10-minute call.
# usage: benchmarks/cuda_check.sh OUTPUT_DIR [PYTHON]   (CUDA_TESTS="..." to test other files)
set -u
out=${1:?usage: benchmarks/cuda_check.sh OUTPUT_DIR [PYTHON]}
py=${2:-python3}
tests=${CUDA_TESTS:-tests/test_ops_triton.py tests/test_ops_triton_unfused.py tests/test_ops_triton_whole.py}
models="dinat_mini swin_tiny_patch4_window7_224"
mkdir -p "$out"
export PYTHONUNBUFFERED=1

steps=" ${STEPS:-tests eager cudagraphs opgraphs wholewindow eagerways} "
step() {  # step NAME SECONDS COMMAND...: run it with a time limit, its output to OUTPUT_DIR/NAME.log
    local name=$1 limit=$2
    shift 2
    [[ $steps == *" $name "* ]] || return 1
    if [ "${NO_LIMITS:-0}" = 1 ]; then "$@"; else timeout "$limit" "$@"; fi >"$out/$name.log" 2>&1
    echo "== $name: exit $?"
}

# shellcheck disable=SC2086  # the test list and models are word lists
step tests 240 env DINAT_TRITON_AUTOTUNE=0 $py -m pytest -q -p no:cacheprovider --durations=10 $tests &&
    tail -15 "$out/tests.log"
# shellcheck disable=SC2086
step eager 125 $py -m dinat.cli bench --device cuda --dtype bfloat16 --batch 128 --repeats 20 --no-reference \
    --models $models --output "$out/eager" &&
    grep -E "^(shape|model|[0-9]+x[0-9]+ |dinat|swin)" "$out/eager.log" | grep -v "^  "
# shellcheck disable=SC2086
step cudagraphs 210 $py -m dinat.cli bench --suite model --compile reduce-overhead --device cuda --dtype bfloat16 \
    --batch 128 --repeats 10 --models $models --output "$out/cudagraphs" &&
    grep -E "^(model|dinat|swin)" "$out/cudagraphs.log"
# shellcheck disable=SC2086
step opgraphs 240 $py -m dinat.cli bench --suite op --compile reduce-overhead --device cuda --dtype bfloat16 \
    --batch 128 --repeats 20 --no-reference --output "$out/opgraphs" &&
    grep -E "^ +[0-9]+x[0-9]+ " "$out/opgraphs.log"
step wholewindow 480 $py benchmarks/cuda_kernels.py --skip-configs --compile reduce-overhead \
    --whole-window sdpa triton --output "$out/wholewindow" &&
    grep -E "^(dinat|swin|side by side|  [0-9]+x[0-9]+ h[0-9]+ d[0-9]+ fwd)" "$out/wholewindow.log"
step eagerways 300 $py benchmarks/cuda_kernels.py --whole-window sdpa triton --output "$out/eagerways" &&
    grep -E "^(dinat|swin|side by side|  [0-9]+x[0-9]+ h[0-9]+ d[0-9]+ (fwd|na2d|window))|^  [0-9]+x[0-9]+ h[0-9]+ d1: best" \
        "$out/eagerways.log"
exit 0  # each step printed its own exit status above (a step not chosen returns 1)
