#!/usr/bin/env bash
# The GPU batch behind docs/RESULTS.md (run on the lent H200 after lab/device/device_stage.py
# staging; `source lab/device/device_env.sh` first). Writes JSON + logs to $RES (default /tmp/res).
# Usage: device_batch.sh cost | costs | quality | all | session3 | session4 | session6 | session7 |
#        session8-scale | session8-spin | session12 | session12-quality | jobs-scale | jobs-after-scale FILE | jobs FILE |
#        alone-then ALONE_FILE [FILE]
# Jobs of the parallel modes go round-robin over the visible GPUs (nvidia-h200-x2: two).
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
TASKS="arc_easy arc_challenge piqa winogrande hellaswag lambada"
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l); [ "$NGPU" -ge 1 ] || NGPU=1
one() {  # one quality.py process: GPU NAME MODEL CONFIG SEED [FP] [extra args]; FP only where asked
  gpu=$1 name=$2 model=$3 config=$4 seed=$5; shift 5
  fp="--no-fp"; if [ "${1:-}" = FP ]; then fp=""; shift; fi
  CUDA_VISIBLE_DEVICES=$gpu python3 ${SCRIPT:-benchmarks/quality.py} --model "$model" --device cuda --configs "$config" \
    --seeds "$seed" $fp --progress --tasks $TASKS --limit 100 "$@" \
    --out "$RES/q_$name.json" > "$RES/q_$name.md" 2> "$RES/q_$name.log"
}
convert_models() {  # GGUF -> float model folders in the cache, once, before parallel jobs read them
  # one process per model (session 7: 4 of the 30 device minutes went to converting one after the
  # other). The device's transformers 5.17 converts Gemma 3's tokenizer without its merges: that
  # conversion now fails (zoo.check_tokenizer_merges), so Gemma 3 jobs need a newer transformers there.
  for m in ${MODELS:-smollm2-135m qwen2.5-coder-0.5b}; do
    python3 -c "from dartquant.zoo import load_model; load_model('$m')" > "$RES/convert_$m.log" 2>&1 &
  done
  wait
}
swaps() {  # issue 17: SpinQuant's R1 with QuaRot's R2 and the reverse, SpinQuant's rotations with RTN weights
  local rot=$RES/rot Q=qwen2.5-coder-0.5b
  local sp=$rot/q_qw_spinquant_0_spinquant_gptq_s0.safetensors
  while [ ! -f "$sp" ]; do sleep 15; done
  python3 lab/swap_rotations.py --model $Q --r1 "$sp" --r2 quarot --seed 0 --out "$rot/swap_spinR1_hadR2.safetensors"
  python3 lab/swap_rotations.py --model $Q --r1 quarot --r2 "$sp" --seed 0 --out "$rot/swap_hadR1_spinR2.safetensors"
  printf '%s\n' "sw_spinR1_hadR2 $Q quarot:gptq:rotations=$rot/swap_spinR1_hadR2.safetensors 0" \
    "sw_hadR1_spinR2 $Q quarot:gptq:rotations=$rot/swap_hadR1_spinR2.safetensors 0" \
    "sw_spin_rtn $Q quarot:rtn:rotations=$sp 0" "sw_quarot_rtn $Q quarot:rtn 0" > "$RES/swaps.txt"
  PARALLEL=4 run_jobs "$RES/swaps.txt"
}
run_jobs() {  # the lines of $1 in order, ${PARALLEL:-8} at a time, round-robin over the GPUs (or all on GPU $2)
  export -f one; export RES TASKS SCRIPT
  awk -v n="$NGPU" -v g="${2:-}" '{print (g == "" ? (NR-1)%n : g), $0}' "$1" |
    xargs -P "${PARALLEL:-8}" -L 1 bash -c 'one "$@"' _
}
case "${1:-quality}" in
cost)
  python3 benchmarks/dartquant_cost.py --shapes llama2-7b llama3-8b --device cuda \
    --out "$RES/cost.json" > "$RES/cost.md" 2> "$RES/cost.log" ;;
quality)
  python3 benchmarks/quality.py --model smollm2-135m --device cuda --seeds 0 1 2 \
    --configs quarot:gptq dartquant:gptq rtn:rtn quarot:rtn \
    --dq-lr-grid 1e-3 1e-2 1e-1 --tasks $TASKS --limit 100 \
    --out "$RES/smollm2_quality.json" > "$RES/smollm2_quality.md" 2> "$RES/smollm2_quality.log" ;;
all)
  # Session 2: both bundled models, every method, 3 seeds, jobs in parallel on the one GPU
  # (small models leave it mostly idle), after the 7B-shape cost table has had the GPU alone.
  export OMP_NUM_THREADS=2
  convert_models &
  python3 benchmarks/e2e_cost.py --shape llama2-7b --device cuda --dtype bfloat16 --batch 8 --micro-batch 8 \
    --steps 2 --dq-samples 128 --out "$RES/e2e_cost_7b.json" > "$RES/e2e_cost_7b.md" 2> "$RES/e2e_cost_7b.log"
  wait
  touch "$RES/DONE-cost"
  jobs_file="$RES/jobs.txt"; : > "$jobs_file"
  add() { echo "$*" >> "$jobs_file"; }  # NAME MODEL CONFIG SEED [EXTRA quality.py args]
  for s in 0 1 2; do
    add "sm_spinquant_$s smollm2-135m spinquant:gptq $s --set e2e_micro_batch=4"
    add "sm_ostquant_$s smollm2-135m ostquant:gptq $s --set e2e_micro_batch=4"
  done
  add "sm_fp smollm2-135m rtn:rtn 0 FP"
  for s in 0 1 2; do
    add "sm_dartquant_$s smollm2-135m dartquant:gptq $s --dq-lr-grid 1e-3 1e-2 1e-1 1 10"
    add "sm_quarot_$s smollm2-135m quarot:gptq $s"
  done
  add "qw_fp qwen2.5-coder-0.5b rtn:rtn 0 FP"
  for s in 0 1 2; do
    add "qw_quarot_$s qwen2.5-coder-0.5b quarot:gptq $s"
    add "qw_dartquant_$s qwen2.5-coder-0.5b dartquant:gptq $s --dq-lr-grid 1e-3 1e-2 1e-1 1 10"
    add "qw_spinquant_$s qwen2.5-coder-0.5b spinquant:gptq $s --set e2e_micro_batch=2"
    add "qw_ostquant_$s qwen2.5-coder-0.5b ostquant:gptq $s --set e2e_micro_batch=2"
  done
  for s in 0 1 2; do
    add "sm_quarotrtn_$s smollm2-135m quarot:rtn $s"
    add "sm_dartquantrtn_$s smollm2-135m dartquant:rtn $s --dq-lr-grid 1e-3 1e-2 1e-1 1 10"
  done
  run_jobs "$jobs_file" ;;
costs)  # the GPU cost rows still missing (RESULTS "Not measured yet"), one GPU, one after the other
  python3 benchmarks/dartquant_cost.py --shapes llama2-7b llama3-8b --device cuda --buffers device host \
    --out "$RES/dq_cost.json" > "$RES/dq_cost.md" 2> "$RES/dq_cost.log"
  python3 lab/r2_memory.py --shape llama2-7b --device cuda --out "$RES/r2_memory_h200.json" \
    > "$RES/r2_memory.md" 2> "$RES/r2_memory.log"
  python3 benchmarks/e2e_cost.py --shape llama2-70b --layers 6 9 --device cuda --dtype bfloat16 --batch 8 \
    --micro-batch 8 --steps 2 --dq-samples 128 --out "$RES/e2e_cost_70b.json" > "$RES/e2e_cost_70b.md" \
    2> "$RES/e2e_cost_70b.log" ;;
session6)  # the three bundled models converted once, then the jobs of lab/device/jobs/session6.txt
  # and, as soon as SpinQuant's seed-0 Qwen rotations exist, the swap experiments (swaps below)
  export OMP_NUM_THREADS=2
  MODELS="smollm2-135m qwen2.5-coder-0.5b gemma3-270m" convert_models
  swaps > "$RES/swaps.log" 2>&1 &
  run_jobs lab/device/jobs/session6.txt
  wait ;;
session7)  # three lanes at once on one H200: Qwen2.5-Coder-1.5B rows (issue 12; folded on the GPU by
  # lab/gpu_quality.py, 40 + 20 eval windows as in RESULTS §7, no zero-shot), the small-model rows
  # (issues 17, 18) and the random-weight scale benchmarks of lab/device/jobs/session7_scale.sh
  export OMP_NUM_THREADS=2
  # the kernels' end-to-end harness first, while the GGUF conversions keep only the CPU busy
  (python3 benchmarks/kernels_e2e.py --out "$RES/kernels_e2e_inmem_h200.json" > "$RES/kern.md" 2> "$RES/kern.log"
   touch "$RES/DONE-kern") &
  MODELS="smollm2-135m qwen2.5-coder-0.5b qwen2.5-coder-1.5b gemma3-270m" convert_models
  for _ in $(seq 30); do [ -f "$RES/DONE-kern" ] && break; sleep 5; done  # at most 150 s more alone
  bash lab/device/jobs/session7_scale.sh > "$RES/scale.log" 2>&1 &
  (SCRIPT=lab/gpu_quality.py TASKS="" PARALLEL=4 run_jobs lab/device/jobs/session7_q15.txt) &
  PARALLEL=4 run_jobs lab/device/jobs/session7_small.txt
  wait ;;
session8-scale)  # issue 15 / 18 at scale (lab/device/jobs/session8_scale.sh), launched after a 2-part first pack
  export OMP_NUM_THREADS=8
  bash lab/device/jobs/session8_scale.sh > "$RES/scale.log" 2>&1 ;;
session8-spin)  # issue 12's missing rows: SpinQuant on Qwen2.5-Coder-1.5B, 3 seeds at once (second pack,
  # WORK=/tmp/work2 so the scale lane's copy stays), folded on the GPU, 40 + 40 windows as in RESULTS §7
  export OMP_NUM_THREADS=2
  MODELS="qwen2.5-coder-1.5b" convert_models
  SCRIPT=lab/gpu_quality.py TASKS="" PARALLEL=3 run_jobs lab/device/jobs/session8_q15.txt ;;
jobs-scale)  # the whole job alone on the GPU: lab/device/jobs/$SCALE_SCRIPT (default session14_scale.sh; earlier
  # sessions ran session1N_scale.sh)
  export OMP_NUM_THREADS=8
  bash "lab/device/jobs/${SCALE_SCRIPT:-session14_scale.sh}" > "$RES/scale.log" 2>&1 ;;
session12)  # two lanes: kernel run 8 alone, then the 70B memory rows (session12_scale.sh) beside the 8B / 7B
  # whole-job rows (session12_rows.sh, which waits for run 8)
  export OMP_NUM_THREADS=8
  bash lab/device/jobs/session12_rows.sh > "$RES/rows.log" 2>&1 &
  bash lab/device/jobs/session12_scale.sh > "$RES/scale.log" 2>&1
  wait ;;
session12-quality)  # issue 17 (WORK=/tmp/work2, after the Qwen pack): once kernel run 8 is done, the
  # W4 / A4 / KV4 / per-role A8 decomposition of QuaRot's gap (no zero-shot) beside the missing 3-seed rows
  export OMP_NUM_THREADS=2
  for _ in $(seq 60); do [ -f "$RES/DONE-kern-run8" ] && break; sleep 5; done
  MODELS="smollm2-135m qwen2.5-coder-0.5b" convert_models
  (TASKS="" PARALLEL=${DECOMP_PARALLEL:-6} run_jobs lab/device/jobs/session12_decomp.txt) &
  PARALLEL=3 run_jobs lab/device/jobs/session12_q17.txt
  wait ;;
jobs-7b-depths)  # the 7B whole job at 8 and 16 layers (lab/device/jobs/session9_7b_depths.sh)
  export OMP_NUM_THREADS=8
  bash lab/device/jobs/session9_7b_depths.sh > "$RES/scale.log" 2>&1 ;;
jobs-after-scale)  # device_batch.sh jobs-after-scale FILE: FILE's quality.py jobs once the jobs-scale lane has
  # measured the 7B and the 70B alone (its DONE-wj70b; at most 20 min of waiting), 4 at a time. Launch it
  # with WORK=/tmp/work2 after carrying the models FILE needs (a second pack), e.g. session9_small.txt:
  # the issue-17 rows still missing (Qwen 0.5B quantization-error DartQuant seeds 1-2, Whip seed 2, RTN,
  # OSTQuant; SmolLM2 DuQuant seed 2), same protocol as RESULTS §2 / §8. AFTER names another marker to
  # wait for (session15_scale.sh: AFTER=DONE-wj8b, its one job alone), WAIT_S the most seconds of waiting
  export OMP_NUM_THREADS=2
  for _ in $(seq $(( ${WAIT_S:-1200} / 5 ))); do [ -f "$RES/${AFTER:-DONE-wj70b}" ] && break; sleep 5; done
  MODELS="smollm2-135m qwen2.5-coder-0.5b" convert_models
  PARALLEL=${PARALLEL:-4} run_jobs "$2" ;;
alone-then)  # device_batch.sh alone-then ALONE_FILE [FILE]: ALONE_FILE's jobs one at a time, each with the GPU
  # to itself (calibration costs), then DONE-alone, then FILE's jobs $PARALLEL at a time (session 25)
  export OMP_NUM_THREADS=2
  PARALLEL=1 run_jobs "$2"; touch "$RES/DONE-alone"
  [ -z "${3:-}" ] || run_jobs "$3" ;;
jobs)  # device_batch.sh jobs FILE: the quality.py jobs listed in FILE (NAME MODEL CONFIG SEED [FP] [args])
  export OMP_NUM_THREADS=2
  run_jobs "$2" ;;
session3)
  # Session 3 (nvidia-h200-x2): the rows sessions 1-2 left missing. GPU 1 first measures
  # DartQuant's whole calibration at 7B/8B shapes (device and host buffers) while GPU 0 starts on
  # the quality jobs, most important first: SmolLM2 SpinQuant/OSTQuant, then Qwen2.5-Coder-0.5B.
  export OMP_NUM_THREADS=2
  convert_models
  [ -n "${SKIP_COST:-}" ] || (CUDA_VISIBLE_DEVICES=$((NGPU - 1)) python3 benchmarks/dartquant_cost.py --shapes llama2-7b llama3-8b \
     --device cuda --buffers device host --out "$RES/dq_cost.json" > "$RES/dq_cost.md" 2> "$RES/dq_cost.log"
   touch "$RES/DONE-dqcost") &
  run_jobs lab/device/jobs/session3.txt
  wait ;;
session4)
  # Session 4 (nvidia-h200-x2): GPU 1 alone measures the cost rows (DartQuant's whole calibration
  # at 7B / 8B after the R2 chunking; the 70B ratios at 4 and 8 layers, extrapolated) while GPU 0
  # runs the quality jobs of lab/device/jobs/session4.txt all at once.
  export OMP_NUM_THREADS=2
  convert_models
  (export CUDA_VISIBLE_DEVICES=1
   python3 benchmarks/dartquant_cost.py --shapes llama2-7b llama3-8b --device cuda --buffers device \
     --out "$RES/dq_cost.json" > "$RES/dq_cost.md" 2> "$RES/dq_cost.log"
   touch "$RES/DONE-dqcost"
   python3 benchmarks/e2e_cost.py --shape llama2-70b --layers 4 8 --device cuda --dtype bfloat16 --batch 8 \
     --micro-batch 8 --steps 2 --dq-samples 128 --out "$RES/e2e_cost_70b.json" > "$RES/e2e_cost_70b.md" \
     2> "$RES/e2e_cost_70b.log"
   touch "$RES/DONE-e2ecost") &
  PARALLEL=${PARALLEL:-10} run_jobs lab/device/jobs/session4.txt 0
  wait ;;
esac
touch "$RES/DONE-${1:-quality}"
