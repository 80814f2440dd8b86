#!/usr/bin/env bash
# Show how a background batch (lab/device/device_launch.sh) is doing and bring its small result
# files back under $OUT/res. Usage: bash lab/device/device_poll.sh [SECONDS_TO_WAIT_FIRST]
sleep "${1:-0}"
ls /tmp/res | head -100
for f in /tmp/res/batch*.log; do echo "== $f"; tail -n 3 "$f"; done 2>/dev/null
for f in /tmp/res/*.log /tmp/wj*/*.log; do echo "== $f"; tail -c 400 "$f" | tr '\r' '\n' | tail -n 2; done 2>/dev/null | tail -n 80
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
# one archive: the device tool brings back only a few files per call
if [ -n "${OUT:-}" ]; then (cd /tmp/res && tar czf "$OUT/res.tgz" $(ls | grep -E '\.(json|md|log)$|^DONE') 2>/dev/null); fi
# kept rotations (quality.py --keep-rotations /tmp/res/rot), a few MB each: with ROT=1, as they are
if [ -n "${OUT:-}" ] && [ "${ROT:-0}" = 1 ] && [ -d /tmp/res/rot ]; then
  ls /tmp/res/rot/*.safetensors 2>/dev/null | grep -v swap_ | head -n 7 | xargs -r -I{} cp {} "$OUT/"
fi
