"""DuQuant's calibration (capture + calibrate stages) at the Qwen2.5-Coder-0.5B shape, random weights,
32 x 2048 random tokens, alone on the GPU: the greedy steps' Haar draws by Householder QR (session 26's
first code: one launch sequence per matrix) against Cholesky QR twice (batched; calib/duquant.py
_cholesky_qr2). One call, no staging (the image has torch and transformers):
    PYTHONPATH=src python3 lab/device/jobs/session26_duquant_calib_speed.py [OUT.json]"""

import contextlib
import json
import sys
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import dartquant.calib.duquant as duq
from dartquant.config import RunConfig


def run(mode: str) -> dict:
    duq._cholesky_qr2 = {"householder": duq.householder_q, "cholesky_qr2": cholesky_qr2}[mode]
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg).float().eval()
    ids = torch.randint(0, cfg.vocab_size, (32, 2048), generator=torch.Generator().manual_seed(0))
    run_cfg = RunConfig.from_flat(method="duquant", device="cuda", seed=0)
    seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def timer(stage):
        torch.cuda.synchronize()
        t = time.perf_counter()
        yield
        torch.cuda.synchronize()
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - t

    t0 = time.perf_counter()
    rot = duq.calibrate_duquant(model, run_cfg, ids, timer=timer, progress=False)
    total = time.perf_counter() - t0
    worst = max((m.double().mT @ m.double() - torch.eye(m.shape[-1], dtype=torch.float64)).abs().max().item()
                for key, m in rot.blocks.items() if not key.endswith(".perm"))
    return {"mode": mode, "capture_s": round(seconds.get("capture", 0), 3),
            "calibrate_s": round(seconds.get("calibrate", 0), 3), "total_s": round(total, 3),
            "max_orthogonality_error": worst}


cholesky_qr2 = duq._cholesky_qr2
rows = []
torch.zeros(1, device="cuda")  # CUDA context outside the timings
for mode in ("householder", "cholesky_qr2", "householder", "cholesky_qr2"):
    rows.append(run(mode))
    print(rows[-1], flush=True)
print("| draws | capture s | calibrate s | max |R^T R - I| |\n|---|---|---|---|")
for r in rows:
    print(f"| {r['mode']} | {r['capture_s']:.2f} | {r['calibrate_s']:.2f} | {r['max_orthogonality_error']:.1e} |")
out = {"machine": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
if len(sys.argv) > 1:
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)
