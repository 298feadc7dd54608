"""Prototype for issue 10: least-squares re-fit of the kept experts' down projections.

The dense analogue (``premoe prune --refit`` on dense models) takes 24% to 87% retention at 50%.
Here, per MoE layer and task, the kept set comes from a score (TCESS or EASY-EP); on the task's
calibration tokens every token is re-routed over the survivors by the family's rule, and the kept
experts' ``down_proj`` are re-fitted jointly so the re-routed block output matches the dense block's:

    min_W  sum_t || y_dense(t) - sum_{e in sel(t)} w_te W_e h_e(t) ||^2 + lam ||W - W0||^2

(h_e: expert e's intermediate activation; the ridge pulls toward the original weights, so a layer
that keeps every routed expert comes back unchanged). Values only: the architecture, expert count
and router stay, so the export still loads in vanilla transformers. Inputs are the dense model's (no
sequential correction). Prints retention at each keep count, plain and re-fitted.

    python bench/moe_refit.py [--keeps 16 8 4] [--tokens 4096] [--lam 1e-2]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from recon_select import capture  # noqa: E402


def refit_layer(layer, h: torch.Tensor, logits: torch.Tensor, kept: list[int], spec, lam: float,
                sweeps: int = 0) -> dict[int, torch.Tensor]:
    """New down_proj [D, I] per kept expert: one joint ridge least-squares solve (``sweeps`` 0, the
    reference), or premoe's own block Gauss-Seidel re-fit (:func:`premoe.moe.refit.refit_layer`)."""
    from premoe.moe.refit import expert_hidden
    from premoe.moe.refit import refit_layer as package_refit
    from premoe.moe.routing import route

    if sweeps:
        return package_refit(layer, h, logits, kept, spec, lam, sweeps)
    experts = layer.experts
    E = spec.num_experts
    T = h.shape[0]
    with torch.inference_mode():
        idx_d, w_d = route(logits, spec, scaled=True)
        acts = {e: expert_hidden(experts, e, h).double() for e in range(E)}
        down = {e: experts.down_proj[e].double() for e in range(E)}  # [D, I]
        y = torch.zeros(T, h.shape[1], dtype=torch.float64)
        for j in range(idx_d.shape[1]):
            for e in idx_d[:, j].unique().tolist():
                rows = idx_d[:, j] == e
                y[rows] += w_d[rows, j, None].double() * (acts[e][rows] @ down[e].T)
        sub = dataclasses.replace(spec, num_experts=len(kept), slots=0, top_k=min(spec.top_k, len(kept)))
        idx, w = route(logits[:, kept], sub, scaled=True)
        I = acts[kept[0]].shape[1]
        Z = torch.zeros(T, len(kept) * I, dtype=torch.float64)
        for j in range(idx.shape[1]):
            for p in idx[:, j].unique().tolist():
                rows = idx[:, j] == p
                Z[rows, p * I:(p + 1) * I] += w[rows, j, None].double() * acts[kept[p]][rows]
        W0 = torch.cat([down[e] for e in kept], 1)  # [D, K*I]
        G = Z.T @ Z / T
        scale = lam * G.diagonal().mean()
        A = G + scale * torch.eye(G.shape[0], dtype=G.dtype)
        B = y.T @ Z / T + scale * W0
        W = torch.linalg.solve(A, B.T).T
    return {e: W[:, p * I:(p + 1) * I].float() for p, e in enumerate(kept)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keeps", type=int, nargs="+", default=[16, 8, 4])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--eval", type=int, default=100)
    ap.add_argument("--lam", type=float, default=1e-2, help="ridge toward the original weights (x mean diagonal)")
    ap.add_argument("--scorers", nargs="+", default=["tcess", "easyep"])
    ap.add_argument("--sweeps", type=int, default=0, help="0: one joint solve; n: premoe's re-fit with n block Gauss-Seidel "
                    "sweeps (one [I, I] system per kept expert)")
    args = ap.parse_args(argv)

    from premoe.api import calibrate
    from premoe.core.data import write_jsonl
    from premoe.core.evaluation import exact_match
    from premoe.moe.loading import load_model
    from premoe.core.tasks import TASKS, samples
    from premoe.moe.plans import make_plan
    from premoe.moe.scoring import score
    from premoe.moe.surgery import apply_plan_
    from premoe.showcase import TINY_MODEL

    torch.manual_seed(0)
    lm = load_model(TINY_MODEL, device="cpu", dtype="float32")
    info, layers, spec = lm.info, lm.layers, lm.info.router
    work = Path(tempfile.mkdtemp(prefix="premoe-moe-refit-"))
    dense_acc, rows, cost = {}, {}, {"calibrate": 0.0, "refit": 0.0}
    for t in TASKS:
        cal = samples(t, args.calib, "calib")
        t0 = time.perf_counter()
        pattern = calibrate(TINY_MODEL, write_jsonl(work / f"{t}.jsonl", cal), t, work / "store", all_stats=True,
                            progress=False)
        cost["calibrate"] += time.perf_counter() - t0
        texts = [r["prompt"] + r["completion"] for r in cal]
        data = capture(lm, layers, spec, texts, args.tokens)
        ev = samples(t, args.eval, "eval")
        dense_acc[t] = exact_match(lm.model, lm.tokenizer, ev, progress=False)
        shape = (len(layers), spec.num_experts)
        for name in args.scorers:
            sc = score(name, pattern.means, shape)
            for keep in args.keeps:
                plan = make_plan(sc, [m.index for m in layers], spec, keep)
                model = copy.deepcopy(lm.model)
                rows.setdefault((name, keep), {})[t] = exact_match(
                    apply_plan_(copy.deepcopy(model), info.spec, plan), lm.tokenizer, ev, progress=False)
                t0 = time.perf_counter()
                for m in layers:
                    h, z, _ = data[m.index]
                    new = refit_layer(m, h, z, sorted(plan.kept[m.index]), spec, args.lam, args.sweeps)
                    with torch.no_grad():
                        for e, wt in new.items():
                            _twin(model, lm.model, m.experts).down_proj[e].copy_(wt)
                cost["refit"] += time.perf_counter() - t0
                net = apply_plan_(model, info.spec, plan)
                rows.setdefault((name + "+refit", keep), {})[t] = exact_match(net, lm.tokenizer, ev, progress=False)
        print(t, {f"{n}@{k}": round(v[t], 2) for (n, k), v in rows.items()}, flush=True)
    dense_mean = sum(dense_acc.values()) / len(dense_acc)
    print(f"\ndense mean exact match {dense_mean:.3f}; retention (mean over tasks / dense mean), lam {args.lam}:")
    names = [n for s in args.scorers for n in (s, s + "+refit")]
    for keep in args.keeps:
        print(f"keep {keep:>2}/{spec.num_experts}: " + "  ".join(
            f"{n} {100 * sum(rows[(n, keep)].values()) / len(TASKS) / dense_mean:5.1f}%" for n in names))
    print(f"cost: calibration {cost['calibrate']:.1f}s, refits {cost['refit']:.1f}s")
    return 0


def _twin(copy_model, orig_model, module):
    """The module of ``copy_model`` at the path ``module`` has in ``orig_model``."""
    name = next(n for n, mod in orig_model.named_modules() if mod is module)
    return copy_model.get_submodule(name)


if __name__ == "__main__":
    raise SystemExit(main())
