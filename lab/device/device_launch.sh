#!/usr/bin/env bash
# Start a long GPU batch in the background (run as the last staging call; see device_stage.py):
#   cp .parts/stage.tar.0NN /tmp/dqstage/ && bash lab/device/device_launch.sh all
# The repository copy on the device is re-laid on every call, so the batch runs from a private
# copy in /tmp/work; results go to /tmp/res. Poll with lab/device/device_poll.sh.
set -eu
repo=$PWD
source lab/device/device_env.sh  # joins the staged pieces, installs the carried wheels (needs .whl here)
# WORK: a second batch started while the first runs needs its own copy (WORK=/tmp/work2)
WORK=${WORK:-/tmp/work}
rm -rf "$WORK" && mkdir -p "$WORK" /tmp/res
cp -r "$repo/src" "$repo/benchmarks" "$repo/lab" "$repo/recipes" "$WORK/"
cd "$WORK"
export PYTHONPATH="$WORK/src:/tmp/site"
setsid nohup bash lab/device/device_batch.sh "$@" > "/tmp/res/batch-$(basename "$WORK").log" 2>&1 < /dev/null &
echo "started: device_batch.sh $* (pid $!)"
