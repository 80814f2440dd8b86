#!/usr/bin/env bash
# Queued in session 38 (issue 16, GPU alone, ~2 minutes on an H100, more on an H200). Direct call, no packs:
#   RES=$OUT bash lab/device/jobs/session38_kernels_next.sh
# (1) the blocks activation kernel with its registers capped (docs/KERNELS.md 1i: 12.5 % occupancy from 11008 wide;
#     offline, a cap of 128 spills nothing); (2) the 4-bit attention's slots A/B again, now with "auto" (the choice
#     since session 38); (2b) the split activation kernel from 8 to 128 tokens (decode batches above DECODE_TOKENS);
#     (3) on an H200 only, session 35's butterfly lane and session 37's kernel lane.
set -u
source "$(dirname "$0")/gpu_env.sh"
timeout 240 python3 lab/device/jobs/session38_maxnreg.py "$RES/act_maxnreg_${GPU}.json" 2>&1 | grep "^|\|wrote\|Error"
timeout 150 python3 lab/device/jobs/session38_split_tokens.py "$RES/act_split_tokens_${GPU}.json" 2>&1 | grep "^|\|wrote\|Error"
timeout 120 python3 lab/device/jobs/session38_kv4_slots_ab.py "$RES/kv4_slots_ab_run2_${GPU}.json" 2>&1 | grep "^|\|wrote\|Error"
[ "$GPU" = h200 ] && RES=$RES bash lab/device/jobs/session37_kernels_next.sh
