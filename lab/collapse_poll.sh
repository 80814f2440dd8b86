#!/usr/bin/env bash
# Poll issue 12's device batch: sleep, show progress, bring /tmp/res back as one archive.
sleep "${1:-0}"
ls /tmp/res; tail -n 4 /tmp/res/batch.log
for f in /tmp/res/*.log; do echo "== $f"; tail -c 600 "$f" | tr '\r' '\n' | grep -v "^\s*$" | tail -n 3; done 2>/dev/null
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader; free -g | head -2
[ -n "${OUT:-}" ] && (cd /tmp/res && tar czf "$OUT/res.tgz" $(ls | grep -E '\.(json|md|log)$|^DONE') 2>/dev/null)
exit 0
