#!/usr/bin/env bash
# Session 45 (issue 16): `dartquant bench RUN --kv kernels` with today's defaults, both sides, Llama-2-7B then Llama-3-8B
# shape (session44_e2e.sh each: prepare + bench), about 320 s in one call, carry [".kb_data"]:
#   RES=$OUT bash lab/device/jobs/session45_e2e.sh
set -u
RES=${RES:-/tmp/res}; mkdir -p "$RES"
RES=$RES SHAPE=llama2-7b timeout 250 bash lab/device/jobs/session44_e2e.sh
echo "[$SECONDS s] llama2-7b done"
if [ "$SECONDS" -lt 300 ]; then RES=$RES SHAPE=llama3-8b timeout $((450 - SECONDS)) bash lab/device/jobs/session44_e2e.sh; fi
echo "[$SECONDS s] end"
