# Sourced by the lab's direct-call kernel lanes: RES (results folder), GPU (h100 / h200, from the card the lease
# gave: files are named by it; session 36 asked for an H200 and got an H100), and the Python paths.
RES=${RES:-/tmp/res}; mkdir -p "$RES"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | grep -o 'H[0-9]\+' | head -n1 | tr H h); GPU=${GPU:-gpu}
export PYTHONUNBUFFERED=1 PYTHONPATH=src:benchmarks
