#!/usr/bin/env bash
# Show how a background batch (scripts/device_launch.sh) is doing and bring its small result
# files back under $OUT/res. Usage: bash scripts/device_poll.sh [SECONDS_TO_WAIT_FIRST]
sleep "${1:-0}"
ls /tmp/res | head -100
tail -n 3 /tmp/res/batch.log 2>/dev/null
for f in /tmp/res/*.log; do echo "== $f"; tail -c 400 "$f" | tr '\r' '\n' | tail -n 2; done 2>/dev/null | tail -n 80
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT/res" && find /tmp/res -maxdepth 1 -type f \( -name '*.json' -o -name '*.md' -o -name 'DONE*' \) -size -5M -exec cp {} "$OUT/res/" \; ; fi
