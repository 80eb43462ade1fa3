#!/usr/bin/env bash
# Every GPU measurement the speed work needs, in one command: the gpu-marked tests, the full
# RTD step against the HF-based one (bench/rtd_step.py), the attention core at several tile
# sizes (bench/attention.py), the chunked MLM head (bench/mlm_head.py), and the quick start's
# learning curve with fused vs eager attention next to a second eager seed, the noise floor
# (bench/compare_runs.py).
#
#   bash bench/gpu_session.sh [OUT_DIR [STAGE ...]]
#
# OUT_DIR defaults to $OUT, else gpu_session/. STAGEs: env tests attention attention_terms
# rtd_warps rtd_512 rtd_norowlanes rtd_posgrad rtd_zeroed rtd_mlm_chunk rtd_2048_b4 mlm_head
# rtd_host rtd_bf16 rtd_options rtd_graphs rtd_rows rtd_dropout attention_dropout rtd_2048 ncu
# curves trainer_512 trainer_gaps trainer_512_zero1 (default: all, in that order, the most needed
# first; one 10-minute call reaches about rtd_bf16). rtd_warps is the step at the warps the
# attention stage found fastest; rtd_norowlanes the step without fused.ROW_LANES, rtd_512's A/B,
# rtd_posgrad with fused.FUSED_POSITION_GRADS and rtd_zeroed with fused.ZERO_IN_KERNEL; rtd_host
# is the step's host-or-GPU account, rtd_graphs the layers as CUDA graphs (part of the fix if the
# host bounds it), rtd_rows its A/B; rtd_bf16 both sides in bf16 weights; rtd_2048_b4 the
# comparison at L=2048 at the batch HF fits on an 80 GB card, rtd_2048 ours at B=8; rtd_options is
# the step with the defaults of 2026-11-27 that were timed only on their own turned off; *_dropout
# run DeBERTa's attention dropout 0.1; ncu profiles the fused kernels; trainer_512 is the real
# trainer, DeepSpeed and data loading included, on the v3-base shape at L=512, for its tokens/s
# and MFU beside rtd_step's bare step, trainer_gaps where its GPU idles in two profiled steps,
# trainer_512_zero1 the trainer with DeepSpeed's ZeRO-1 optimizer it ran before 27bbd0b. Each
# stage has its own time limit, cut to what is left of BUDGET_S (580 s, inside the device tool's
# 10-minute command; the stages of 7a09b79, without rtd_runs and ncu, took 451 s on an H100), and
# writes OUT_DIR/<stage>.log as it goes, so a stage that overruns leaves the others' results; run
# the missing ones again (the machine stays warm for 30 s after a call, so a second call right
# away starts no new one). Exits 1 when a stage failed or was skipped.
#
# It needs this project's Python dependencies. Where the GPU machine's image lacks some
# (hydra-core, omegaconf, deepspeed and their own), put their wheels in .whl/ and they are
# installed to /tmp/site first. The curves use the quick start's corpus from .gpu_corpus/
# (shards/ and tokenizer/, as `python -m pretrain experiment=quickstart` caches it under
# ~/.cache/pretrain), or that cache when .gpu_corpus/ is absent.
#
#   bash bench/gpu_session.sh --prepare [PYTHON_VERSION]
#
# fills .whl/ (wheels for PYTHON_VERSION, default 3.12, the GPU image's; deepspeed and antlr4
# are built here, pure Python) and .gpu_corpus/ (a copy of the cached corpus) from this
# machine's install; both are git-ignored and travel only when a device call carries them.
set -u
if [ "${1:-}" = "--prepare" ]; then
    version=${2:-3.12}
    pip=(python -m pip)
    rm -rf .whl && mkdir .whl || exit 1
    pinned() { for name in "$@"; do echo "$name==$("${pip[@]}" show "$name" | awk '/^Version:/{print $2}')"; done; }
    mapfile -t binary < <(pinned hydra-core omegaconf pydantic pydantic-core annotated-types \
        typing-inspection typing-extensions hjson)
    mapfile -t built < <(pinned deepspeed antlr4-python3-runtime)
    "${pip[@]}" download -q --no-deps --only-binary=:all: --python-version "$version" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${binary[@]}" &&
        "${pip[@]}" wheel -q --no-deps --no-build-isolation -w .whl "${built[@]}" || exit 1
    cached=$(find "$HOME/.cache/pretrain" -maxdepth 1 -name 'default_corpus_*' | sort | tail -n 1)
    [ -n "$cached" ] || { echo "error: no cached corpus; run the quick start once" >&2; exit 1; }
    rm -rf .gpu_corpus && cp -r "$cached" .gpu_corpus && du -sh .whl .gpu_corpus
    exit
fi
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

corpus=.gpu_corpus
if [ ! -d "$corpus" ]; then
    corpus=$(find "$HOME/.cache/pretrain" -maxdepth 1 -name 'default_corpus_*' 2>/dev/null | sort | tail -n 1)
fi

# The quick start's first 300 steps three times, then the comparison (run as its own process,
# so that the stage's time limit covers all of it).
if [ "${1:-}" = "--curves" ]; then
    runs=$2/runs
    steps=${CURVE_STEPS:-300} # fewer for a dry run of this script
    common=(experiment=quickstart "data.corpus=$corpus/shards" "data.tokenizer=$corpus/tokenizer"
        "trainer.max_steps=$steps" "trainer.eval_every=$(((steps + 2) / 3))" trainer.save_every=0
        logging.progress_bar=false logging.plots=false model.attention_probs_dropout_prob=0)
    read -ra extra <<<"${CURVE_OVERRIDES:-}" # e.g. a smaller batch for a dry run
    common+=("${extra[@]}")
    rm -rf "$runs"
    "$py" -m pretrain "${common[@]}" "run_dir=$runs/eager" model.attention_impl=eager &&
        "$py" -m pretrain "${common[@]}" "run_dir=$runs/triton" model.attention_impl=triton &&
        "$py" -m pretrain "${common[@]}" "run_dir=$runs/eager_seed1" model.attention_impl=eager \
            trainer.seed=1 &&
        "$py" bench/compare_runs.py "$runs/eager" "$runs/triton" "$runs/eager_seed1" --seed-run
    exit
fi

out=${1:-${OUT:-gpu_session}}
shift || true
stages=${*:-env tests attention attention_terms rtd_warps rtd_512 rtd_norowlanes rtd_posgrad rtd_zeroed rtd_mlm_chunk rtd_2048_b4 mlm_head rtd_host rtd_bf16 rtd_options rtd_graphs rtd_rows rtd_dropout attention_dropout rtd_2048 ncu curves trainer_512 trainer_gaps trainer_512_zero1}
mkdir -p "$out"
# Stages stop here at the latest, inside the device tool's 10-minute command.
deadline=$((SECONDS + ${BUDGET_S:-580}))
failed=()
if [ -d .whl ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}

# stage NAME SECONDS COMMAND...: run it under a time limit (cut to what is left before the
# deadline; skipped under 20 s), log to $out/NAME.log, show the tail, remember a failure.
stage() {
    local name=$1 limit=$2
    shift 2
    local left=$((deadline - SECONDS))
    if ((left < 20)); then
        echo "== $name: skipped, ${left}s left"
        failed+=("$name(skipped)")
        return 0
    fi
    ((limit > left)) && limit=$left
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS rc
    timeout -k 10 "$limit" "$@" >"$out/$name.log" 2>&1 # -k: trainers save on SIGTERM first
    rc=$?
    echo "   exit $rc after $((SECONDS - start))s"
    ((rc == 0)) || failed+=("$name(exit $rc)")
    grep -v -E "Warning|warnings.warn|^ *check\(|^\[.*\] \[WARNING\]" "$out/$name.log" | tail -n 40
}

# The fused kernel's rows first (HF's row comes before ours at each length).
bench=("$py" bench/rtd_step.py --attention triton eager --compile both --warmup 2 --steps 5)
stage_env() {
    stage env 20 "$py" -c "import subprocess, torch, triton, transformers
print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())
subprocess.run(['nvidia-smi', '--query-gpu=name,memory.total,driver_version', '--format=csv'])"
}
# --profile: the busiest kernels of one step of each row, for the next round of speed work.
stage_rtd_512() {
    stage rtd_512 150 "${bench[@]}" --seq-len 512 --batch 32 --profile
}
# Is the step bound by the host or by its kernels? The profiled step's GPU-busy share (each
# profile above prints it too) and where the GPU idles, with what the host was doing then
# (bench/trace_gaps.py, on the chrome trace kept in traces/).
stage_rtd_host() {
    stage rtd_host 90 "$py" bench/rtd_step.py --impl ours --attention triton --compile on \
        --seq-len 512 --batch 32 --warmup 2 --steps 5 --profile --trace "$out/traces"
}
# Both sides again with bf16 weights and fp32 master weights (--precision bf16, what our
# trainer's DeepSpeed bf16 runs: no autocast casts), beside both in autocast, in one run.
stage_rtd_bf16() {
    stage rtd_bf16 100 "$py" bench/rtd_step.py --attention triton --compile on --precision autocast \
        bf16 --seq-len 512 --batch 32 --warmup 2 --steps 5
}
# L=2048 at B=4: HF's step does not fit at B=8 on an 80 GB card (the issue measured 49 GiB for
# its encoder alone; on an H100 it ran out of memory), so the comparison is at B=4, with the
# fused kernel only (compiled and not), to keep within time.
stage_rtd_2048_b4() {
    stage rtd_2048_b4 80 "$py" bench/rtd_step.py --attention triton --compile both --seq-len 2048 \
        --batch 4 --warmup 2 --steps 5
}
# The full step without the two defaults of 2026-11-27 that were timed only on their own
# (fused.UNIFORM_TILES, and the MLM head's Triton kernel, heads.MLM_IMPL; the attention and
# mlm_head stages time them alone), ours only: compare with the fused rows of rtd_512 /
# rtd_2048_b4.
stage_rtd_options() {
    stage rtd_options 70 "$py" bench/rtd_step.py --impl ours --attention triton --no-uniform-tiles \
        --mlm-torch --warmup 2 --steps 5 --seq-len 512 2048 --batch 32 4
}
# The gpu-marked tests: the files that hold them (collecting the whole suite costs time, and
# modules that need packages the image lacks would only fail to collect).
stage_tests() {
    stage tests 100 "$py" -m pytest -q -m gpu -p no:cacheprovider tests/unit/test_fused_attention.py \
        tests/unit/test_deberta_parity.py tests/unit/test_mlm_objective.py
}
# Each layer's compiled work replayed as CUDA graphs (torch.compile's reduce-overhead; three per
# layer, the fused attention launched between them): if rtd_host finds the step waiting for the
# host's launches, this is part of the fix; compare with the
# compiled fused rows of rtd_512 / rtd_2048_b4. Three warm-up steps: CUDA graph trees run the
# first eagerly and record in the second.
stage_rtd_graphs() {
    stage rtd_graphs 90 "$py" bench/rtd_step.py --impl ours --attention triton --compile on \
        --compile-mode reduce-overhead --warmup 3 --steps 5 --seq-len 512 2048 --batch 32 4
}
# The compiled step with the per-pair position gathers' and atomics' lanes as Triton picks
# them (fused.ROW_LANES off), against rtd_512's row with them along each table row.
stage_rtd_norowlanes() {
    stage rtd_norowlanes 50 "$py" bench/rtd_step.py --impl ours --attention triton --compile on \
        --no-row-lanes --seq-len 512 --batch 32 --warmup 2 --steps 5
}
# The compiled step with the position gradients' one kernel (fused.FUSED_POSITION_GRADS),
# against rtd_512's row with the torch glue's cast, GEMM and add.
stage_rtd_posgrad() {
    stage rtd_posgrad 50 "$py" bench/rtd_step.py --impl ours --attention triton --compile on \
        --fused-position-grads --seq-len 512 --batch 32 --warmup 2 --steps 5
}
# The compiled step with the backward's programs zeroing the position-gradient rows they alone
# write (fused.ZERO_IN_KERNEL) instead of a fill before the kernel, against rtd_512's row.
stage_rtd_zeroed() {
    stage rtd_zeroed 50 "$py" bench/rtd_step.py --impl ours --attention triton --compile on \
        --zero-in-kernel --seq-len 512 --batch 32 --warmup 2 --steps 5
}
# Our step with the MLM head's chunks at 2^28 logits (two chunks at v3-base B=32 L=512)
# instead of the default 2^26: the head alone took 10.0 ms against 12.0 on an H200
# (mlm_head stage), 0.8 GiB more; compare with rtd_512's compiled fused row.
stage_rtd_mlm_chunk() {
    stage rtd_mlm_chunk 50 "$py" bench/rtd_step.py --impl ours --attention triton --compile on \
        --mlm-chunk-elements 268435456 --seq-len 512 --batch 32 --warmup 2 --steps 5
}
# The masked rows found on the device again (--device-rows, the wait for the GPU each step that
# 9729a9e removed), to compare with rtd_512's uncompiled fused row.
stage_rtd_rows() {
    stage rtd_rows 45 "$py" bench/rtd_step.py --impl ours --attention triton --device-rows \
        --seq-len 512 --batch 32 --warmup 2 --steps 5 --profile
}
# The attention core alone, profiled, beside its deterministic backward, eager and SDPA: the
# default launch, the one without fused.ROW_LANES, the ones with fused.FUSED_POSITION_GRADS and
# with fused.ZERO_IN_KERNEL, and the forward, the backward and both at 16 warps
# (fused.FORWARD_WARPS, BACKWARD_WARPS; 128 registers a thread instead of 255, so twice the
# warps per SM). The gather kernels without uniform tiles (4.55 / 12.81 ms against 4.72 /
# 9.39) and their backward's atomic options (+runs, +half, +singles) were timed on 78f0ec9, the
# windowed kernels and diagonal position gradients on 2026-11-28 (docs/speed.md); none is
# timed again.
stage_attention() {
    stage attention 80 "$py" bench/attention.py --steps 5 --profile \
        --tiles default default+norowlanes default+posgrad default+zeroed default+fw16 \
        default+bw16 default+fw16+bw16
}
# The same core with c2p alone, p2c alone and no position terms (default launch): what each
# term's gathers and atomics add to the kernels, and the kernels' own attention against SDPA.
stage_attention_terms() {
    stage attention_terms 50 "$py" bench/attention.py --steps 5 --terms c2p p2c none
}
# The step at the warps the attention stage (run before it) timed fastest at L=512, when that
# is not the default: "triton default+fw16" in attention.log's rows -> --fused-warps 16/8.
stage_rtd_warps() {
    local best
    best=$(awk '$1 == "triton" && $2 ~ /^default(\+[fb]w16)*$/ && $3 == 512 && $5 + 0 > 0 {
        if (min == "" || $5 < min) { min = $5; best = $2 } } END { print best }' \
        "$out/attention.log" 2>/dev/null)
    if [ -z "$best" ] || [ "$best" = "default" ]; then
        echo "== rtd_warps: skipped, the fastest launch is ${best:-unknown}"
        return 0
    fi
    local fwd=8 bwd=8
    [[ $best == *fw16* ]] && fwd=16
    [[ $best == *bw16* ]] && bwd=16
    stage rtd_warps 80 "$py" bench/rtd_step.py --impl ours --attention triton --compile on \
        --fused-warps "$fwd/$bwd" --seq-len 512 2048 --batch 32 4 --warmup 2 --steps 5
}
# DeBERTa's published attention dropout, 0.1, on both sides: the fused kernel's in-kernel
# dropout (what auto runs under dropout since 2026-11-27) against eager and HF; then the attention core alone with it, at the default and the spill-free backward tile.
stage_rtd_dropout() {
    stage rtd_dropout 110 "$py" bench/rtd_step.py --attention triton eager --attention-dropout 0.1 \
        --warmup 2 --steps 5 --seq-len 512 --batch 32
}
stage_attention_dropout() {
    stage attention_dropout 40 "$py" bench/attention.py --steps 5 --dropout 0.1 --seq-len 512 \
        --batch 32 --tiles default 128x64/32x64
}
# The MLM head alone: plain, chunked with torch ops, chunked with the Triton kernel, the
# chunked ones at 2^26 logits a chunk (the default, 5 chunks at v3-base B=32 L=512) and 2^28
# (2 chunks), the kernel at its own launch (2048x8) and two others, each profiled.
stage_mlm_head() {
    stage mlm_head 75 "$py" bench/mlm_head.py --chunk-elements 67108864 268435456 \
        --fused-launch 2048x8 4096x8 2048x4 --profile
}
# Ours at L=2048, B=8, fused and eager (HF's row runs out of memory on an 80 GB card).
stage_rtd_2048() {
    stage rtd_2048 170 "${bench[@]}" --seq-len 2048 --batch 8
}
# Nsight Compute on the fused kernels' first launches at L=512 B=32 (forward and backward, the
# default form): whether they are bound by memory, atomics or the tensor cores. Skipped where
# ncu is not installed.
stage_ncu() {
    if ! command -v ncu >/dev/null; then
        echo "== ncu: skipped, ncu is not installed"
        return 0
    fi
    stage ncu 60 ncu --clock-control none --kernel-name "regex:_forward_kernel|_backward_kernel" \
        --launch-count 2 --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats \
        --section WarpStateStats "$py" bench/attention.py --seq-len 512 --batch 32 --warmup 1 \
        --steps 1
}
stage_curves() {
    stage curves 150 bash "$0" --curves "$out"
}
# 40 steps of python -m pretrain on the base preset (fused attention, bf16, ZeRO-1, which runs
# DeepSpeed's bf16 optimizer) over the quick start's corpus; metrics.jsonl's tokens_per_s and
# mfu at steps 20-40 are the figures. trainer_512_zero1 is the same run with DeepSpeed's ZeRO-1
# optimizer (bf16 gradient sums, ~7x the step's operators), what the trainer ran before 27bbd0b.
trainer_args=(experiment=deberta_v3_base model.attention_impl=triton
    model.attention_probs_dropout_prob=0 "data.corpus=$corpus/shards"
    "data.tokenizer=$corpus/tokenizer" model.vocab_size=128100 trainer.max_steps=40
    trainer.global_batch_size=32 trainer.micro_batch_size=32 trainer.log_every=10
    trainer.eval_every=0 trainer.save_every=0 optim.warmup_steps=10 logging.progress_bar=false
    logging.plots=false)
stage_trainer_512() {
    stage trainer_512 100 "$py" -m pretrain "${trainer_args[@]}" logging.profile_steps=2 \
        logging.profile_from=30 "hydra.run.dir=$out/trainer_512_run"
}
# Where the real trainer's GPU idles in steps 30-31 (DeepSpeed's step, data loading, the loss
# read before each backward), from the trace trainer_512 wrote.
stage_trainer_gaps() {
    stage trainer_gaps 30 "$py" bench/trace_gaps.py \
        "$out/trainer_512_run/profile/rank00000_steps30-31.json.gz"
}
stage_trainer_512_zero1() {
    stage trainer_512_zero1 100 "$py" -m pretrain "${trainer_args[@]}" \
        +deepspeed.extra.data_types.grad_accum_dtype=bf16 "hydra.run.dir=$out/trainer_512_zero1_run"
}

# The stages run in the order named (a stage_NAME function each; where they are defined does
# not matter), each once: a name given twice would rerun it and overwrite its log.
declare -A ran=()
for name in $stages; do
    if [ -n "${ran[$name]:-}" ]; then
        echo "== $name: named again, not rerun"
        continue
    fi
    ran[$name]=1
    if declare -F "stage_$name" >/dev/null; then
        "stage_$name"
    else
        echo "== $name: no such stage"
        failed+=("$name(unknown)")
    fi
done

if ((${#failed[@]})); then
    echo "not clean: ${failed[*]}"
    exit 1
fi
echo "all stages passed"
