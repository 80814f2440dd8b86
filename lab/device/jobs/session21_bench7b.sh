#!/usr/bin/env bash
# Issue 16, session 21: the 4-bit K/V cache kernels alone (session21_kv4.py: codes checked, then timed
# against bf16 SDPA at Llama-2-7B / Llama-3-8B attention shapes), then `dartquant bench --kv kernels` on
# a quantized Llama-2-7B-shape run folder: session22_bench7b.sh with session 21's kernel job.
# Direct call, carry [".kb_data"]:
#   RES=$OUT bash lab/device/jobs/session21_bench7b.sh
KV4_JOB=session21_kv4 exec bash "$(dirname "$0")/session22_bench7b.sh"
