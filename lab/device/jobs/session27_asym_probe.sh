#!/usr/bin/env bash
# Issue 17, queued in session 26: RESULTS §27c's probe (lab/gptq_asym_layers.py) over all 24 layers of
# Qwen2.5-Coder-0.5B at the full protocol's 32 x 2048 calibration tokens (16 windows fitted, 16 held
# out), DuQuant rotations: does the asymmetric target generalize beyond layer 0 with 4x the tokens of
# §27c? Needs the Qwen pack and .whl staged (docs/DEVELOPERS.md §1); run after device_env.sh, e.g. as a
# job beside a batch:  RES=/tmp/res bash lab/device/jobs/session27_asym_probe.sh &
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
python3 lab/gptq_asym_layers.py --json "$RES/gptq_asym_layers_qwen_duquant_h200.json" -- \
  --model qwen2.5-coder-0.5b --method duquant --seed 0 --calib-samples 32 --calib-seqlen 2048 \
  --eval-max-windows 1 --skip-fp-eval --gptq-asymmetric true --fail-on-collapse false --device cuda \
  --out /tmp/asym_probe_run --overwrite > "$RES/asym_probe.log" 2>&1
grep -a "\[probe\]" "$RES/asym_probe.log" | tail -n 30
