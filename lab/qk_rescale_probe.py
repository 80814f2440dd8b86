"""Issue 17 (CPU probe, one-off): a per-channel rescale of Q and K that lowers the 4-bit K cache's error.

q . k is unchanged when q_proj's output channels are multiplied by s and k_proj's divided by s, and RoPE
commutes with it when s is equal on the two channels of each rotary pair. After R3's Hadamard the K
quantizer's error is roughly isotropic with a size set by |k|, so the expected error of a score is about
E|q*s|^2 E|k/s|^2 / head_dim; s_p = (rms k_p / rms q_p)^(alpha/2) per pair (alpha 1: the minimum,
(sum_p rms q_p rms k_p)^2) balances them (QServe's SmoothAttention, by second moments). The statistics
come from calibration windows (wiki train) run through the quantized model as run. Applied to a
finished run folder this is exact for its 4-bit weights: scaling a whole output row of a per-row
quantized weight scales its row scale and leaves its codes alone, and K's bias (kept out of the K
quantizer) scales with it. So each alpha is a paired comparison on the same weights.
    PYTHONPATH=src python lab/qk_rescale_probe.py RUN [RUN ...] --alpha 0.5 1 --windows 4 --json OUT
With --scored, also the product's `qk_balance` (calib/qk_balance.py: the strength chosen per layer by the
K cache's attention-output error) computed on the run's own calibration windows (16 x 512, its seed)
through the quantized model: what `--qk-balance true` would give, but for statistics taken from the
4-bit model instead of the FP one.
"""
import argparse
import json
from pathlib import Path

import torch

from dartquant.adapters import adapter_for
from dartquant.data import calib_windows, eval_windows
from dartquant.eval.ppl import perplexity
from dartquant.zoo import load_model


def pair_rms(sq: torch.Tensor) -> torch.Tensor:
    """[..., D] mean squares -> [..., D/2] rms of each rotary pair (i, i + D/2)."""
    d = sq.shape[-1] // 2
    return (sq[..., :d] + sq[..., d:]).sqrt()


@torch.no_grad()
def qk_stats(model, layers, ids, n_heads, n_kv, head_dim):
    sums, hooks = {}, []

    def hook(key, minus_bias):
        def f(m, i, o):
            y = o - m.bias if (minus_bias and m.bias is not None) else o
            y = y.reshape(-1, y.shape[-1]).double()
            prev = sums.get(key, (0, 0))
            sums[key] = (prev[0] + (y ** 2).sum(0), prev[1] + y.shape[0])
        return f

    for i, lm in enumerate(layers):
        hooks += [lm.q.register_forward_hook(hook((i, "q"), False)), lm.k.register_forward_hook(hook((i, "k"), True))]
    for w in ids:
        model(w[None])
    for h in hooks:
        h.remove()
    out = []
    for i in range(len(layers)):
        q2 = sums[(i, "q")][0] / sums[(i, "q")][1]
        k2 = sums[(i, "k")][0] / sums[(i, "k")][1]
        q2 = q2.reshape(n_kv, n_heads // n_kv, head_dim).mean(1)  # the group's query heads share one s
        out.append((pair_rms(q2), pair_rms(k2.reshape(n_kv, head_dim))))
    return out


def scales(stats, alpha):
    res = []
    for a, b in stats:
        s = (b / a).clamp_min(1e-12) ** (alpha / 2)
        s = s / s.log().mean(-1, keepdim=True).exp()  # geometric mean 1 per head
        res.append(torch.cat([s, s], -1))  # [n_kv, head_dim], equal on each rotary pair
    return res


@torch.no_grad()
def apply_(layers, s_list, originals, n_heads, n_kv, head_dim):
    for lm, s, (qw, qb, kw, kb) in zip(layers, s_list, originals):
        sq = s.repeat_interleave(n_heads // n_kv, dim=0).reshape(-1).to(qw.dtype)
        sk = s.reshape(-1).to(kw.dtype)
        lm.q.weight.copy_(qw * sq[:, None])
        lm.k.weight.copy_(kw / sk[:, None])
        if qb is not None:
            lm.q.bias.copy_(qb * sq)
        if kb is not None:
            lm.k.bias.copy_(kb / sk)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--alpha", type=float, nargs="*", default=[1.0])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--calib", type=int, default=4, help="calibration windows of 512 tokens for the statistics")
    ap.add_argument("--skip-as-run", action="store_true")
    ap.add_argument("--scored", action="store_true", help="also the product's qk_balance (strength per layer)")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    rows = []
    for run in args.runs:
        model, tok = load_model(run, dtype=torch.float32)
        model.eval()
        adapter = adapter_for(model)
        g = adapter.geometry(model.config)
        layers = adapter.layers_of(model)
        if any(lm.q_norm is not None for lm in layers):
            raise SystemExit("QK-norm families: the scale would go into q_norm / k_norm's gains; not done here")
        originals = [(lm.q.weight.clone(), None if lm.q.bias is None else lm.q.bias.clone(),
                      lm.k.weight.clone(), None if lm.k.bias is None else lm.k.bias.clone()) for lm in layers]
        stats = qk_stats(model, layers, calib_windows(tok, "wiki", n=args.calib, seqlen=512, seed=0),
                         g.n_heads, g.n_kv_heads, g.head_dim)
        bound = [float((a * b).sum() ** 2 / ((a ** 2).sum() * (b ** 2).sum())) for a, b in stats]
        print(f"{run}: expected K-error factor at alpha 1 per layer (mean over heads): "
              + " ".join(f"{x:.2f}" for x in bound), flush=True)
        data = {c: eval_windows(tok, c, seqlen=2048, max_windows=args.windows) for c in ("wiki", "c4")}
        probe = data["wiki"][:1, :128]
        # the rescale is exact with every quantizer off (with them on, round-off flips 4-bit codes)
        off = [(m, n, getattr(m, n)) for m in model.modules() for n in ("k_quantizer", "v_quantizer", "input_quantizer")
               if getattr(m, n, None) is not None]
        for m, n, _ in off:
            setattr(m, n, None)
        plain = model(probe).logits
        apply_(layers, scales(stats, 1.0), originals, g.n_heads, g.n_kv_heads, g.head_dim)
        exact = float((model(probe).logits - plain).abs().max() / plain.abs().max())
        apply_(layers, scales(stats, 0.0), originals, g.n_heads, g.n_kv_heads, g.head_dim)
        for m, n, q in off:
            setattr(m, n, q)
        print(f"rescale with the {len(off)} quantizers off: relative max logit change {exact:.1e}", flush=True)
        ref = model(probe).logits
        settings = [(a, None) for a in ([] if args.skip_as_run else [0.0]) + args.alpha]
        if args.scored:
            from dartquant.calib.qk_balance import qk_balance
            from dartquant.config import RunConfig

            seed = json.loads((Path(run) / "metrics.json").read_text())["seed"]
            s_prod, meta = qk_balance(model, calib_windows(tok, "wiki", n=16, seqlen=512, seed=seed),
                                      kv_spec=RunConfig().scheme.kv_spec(g.head_dim), r3=True)
            print(f"{run}: scored strengths {meta['qk_balance_alpha']}, attention error x"
                  f"{meta['qk_balance_attention_error_ratio']}", flush=True)
            settings.append(("scored", [x.view(g.n_kv_heads, g.head_dim) for x in s_prod.double()]))
        for alpha, given in settings:
            apply_(layers, given if given is not None else scales(stats, alpha), originals, g.n_heads, g.n_kv_heads,
                   g.head_dim)
            # the rescale itself is exact: only the K quantizer's input changes (logits differ by its rounding)
            row = {"run": run, "alpha": alpha, "windows": args.windows, "rescale_exact_rel": exact,
                   "logit_max_abs_diff_128_tokens": float((model(probe).logits - ref).abs().max())}
            for c, w in data.items():
                row[c] = perplexity(model, w, progress=False)["ppl"]
            print(f"{run:28s} alpha {alpha}: wiki {row['wiki']:.3f}  c4 {row['c4']:.3f}", flush=True)
            rows.append(row)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
