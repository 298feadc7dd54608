"""Task routing for dense models: SEAP's proof of concept against premoe's centroid retrieval.

SEAP routes a query with a classifier trained on the mean token embedding of the task corpora (its
proof of concept: logistic regression). premoe's dense router (``premoe.dense.router.DenseRouter``)
stores one centroid per task (the mean of the L2-normalised mean hidden states of the task's
calibration prompts) at every depth and routes to the nearest (cosine), at the depth where the
stored centroids are best separated (``depth="auto"``, chosen from the store alone).

Both learn from the same calibration prompts and are scored on held-out prompts:

* part 1: the built-in task suite on the shipped tiny dense model (evaluation split);
* part 2, harder: eight synthetic "tasks" that are overlapping random character distributions
  (keys from 8 samples of 24 characters, queries 4 to 8 characters), on the shipped model and on a
  random tiny model of every dense family row.

Rows: ``centroid@k`` (nearest centroid after k decoder layers, k=0 is the embeddings), ``logreg@k``
(multinomial logistic regression, L2 penalty, LBFGS, on the same features; ``logreg@0`` is SEAP's
proof of concept) and ``auto`` (what ``premoe route`` does).

    python bench/dense_routing.py [--queries 200] [--calib 64]
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import premoe  # noqa: E402
from premoe.assets import TINY_DENSE  # noqa: E402
from premoe.core.data import write_jsonl  # noqa: E402
from premoe.core.store import PatternStore  # noqa: E402
from premoe.core.tasks import TASKS, samples  # noqa: E402
from premoe.dense.calibration import prompt_features  # noqa: E402
from premoe.dense.model import load_dense  # noqa: E402
from premoe.dense.router import DenseRouter  # noqa: E402
from premoe.testing import DENSE_FAMILIES, build_dense_model  # noqa: E402


def logreg(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float = 1e-3, steps: int = 200) -> torch.nn.Linear:
    """Multinomial logistic regression (full-batch LBFGS) on standardised features."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(x), y) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def compare(
    model_dir: Path, work: Path, calib: dict[str, list[dict]], queries: dict[str, list[str]]
) -> dict[str, float]:
    """Held-out routing accuracy of every row (see the module docstring)."""
    names = sorted(calib)
    work.mkdir(parents=True, exist_ok=True)
    for t in names:
        premoe.calibrate(
            model_dir,
            write_jsonl(work / f"{t}.jsonl", calib[t]),
            t,
            work / "store",
            overwrite=True,
            dtype="float32",
            progress=False,
        )
    info, lm, tok = load_dense(model_dir, dtype="float32")
    store = PatternStore.open(work / "store")
    cents = torch.nn.functional.normalize(
        torch.stack([store.load(t).signature["prompt.hidden"] for t in names]), dim=-1
    )
    train_x, train_y = [], []
    for j, t in enumerate(names):
        prompts = [r.get("prompt", r.get("text")) for r in calib[t]]
        train_x.append(prompt_features(lm, info, tok, prompts))
        train_y += [j] * len(prompts)
    train_x, train_y = torch.cat(train_x), torch.tensor(train_y)
    q_texts = [q for t in names for q in queries[t]]
    truth = torch.tensor([j for j, t in enumerate(names) for _ in queries[t]])
    q = prompt_features(lm, info, tok, q_texts)  # [Q, L+1, D]
    out = {}
    for k in range(info.num_layers + 1):
        out[f"centroid@{k}"] = float(((q[:, k] @ cents[:, k].T).argmax(-1) == truth).float().mean())
        mu, sd = train_x[:, k].mean(0), train_x[:, k].std(0).clamp_min(1e-6)
        lin = logreg((train_x[:, k] - mu) / sd, train_y, len(names))
        with torch.no_grad():
            out[f"logreg@{k}"] = float((lin((q[:, k] - mu) / sd).argmax(-1) == truth).float().mean())
    router = DenseRouter(model_dir, work / "store")
    routed = [r.task for r in router.route_many(q_texts)]
    out["auto"] = sum(a == names[b] for a, b in zip(routed, truth.tolist())) / len(q_texts)
    out["auto_depth"] = router.depth
    return out


def show(title: str, results: dict[str, dict[str, float]]) -> None:
    cols = list(results)
    rows = [k for k in next(iter(results.values())) if k != "auto_depth"]
    print(f"\n{title}")
    print(f"{'router':<12} " + " ".join(f"{c[:12]:>12}" for c in cols))
    for r in rows:
        print(f"{r:<12} " + " ".join(f"{results[c].get(r, float('nan')):>12.3f}" for c in cols))
    print(f"{'auto depth':<12} " + " ".join(f"{results[c]['auto_depth']:>12}" for c in cols))


def synthetic_tasks(n_tasks: int, n_queries: int, seed: int = 0):
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dists = [torch.distributions.Dirichlet(torch.full((len(alphabet),), 0.3)).sample() for _ in range(n_tasks)]

    def draw(d, n):
        return "".join(alphabet[i] for i in torch.multinomial(d, n, replacement=True, generator=gen).tolist())

    calib = {f"t{j}": [{"text": draw(d, 24)} for _ in range(8)] for j, d in enumerate(dists)}
    queries = {f"t{j}": [draw(d, rng.randint(4, 8)) for _ in range(n_queries)] for j, d in enumerate(dists)}
    return calib, queries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=200, help="held-out prompts per task")
    ap.add_argument("--calib", type=int, default=64, help="calibration samples per task")
    ap.add_argument("--model", type=Path, default=TINY_DENSE)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    work = Path(tempfile.mkdtemp(prefix="premoe-dense-routing-"))

    calib = {t: samples(t, args.calib, "calib") for t in TASKS}
    queries = {t: [s["prompt"] for s in samples(t, args.queries, "eval")] for t in TASKS}
    part1 = {"built-in": compare(args.model, work / "builtin", calib, queries)}
    show(
        f"part 1: built-in tasks on {args.model.name}, {args.queries} held-out prompts per task, "
        f"{args.calib} calibration samples per task",
        part1,
    )

    calib, queries = synthetic_tasks(8, max(args.queries // 4, 10))
    part2 = {"shipped": compare(args.model, work / "syn-shipped", calib, queries)}
    for fam, over in DENSE_FAMILIES.items():
        model = build_dense_model(work / f"model-{fam}", fam, **over)
        part2[fam] = compare(model, work / f"syn-{fam}", calib, queries)
    show("part 2: 8 synthetic overlapping character distributions, 8 x 24-character keys, 4-8 character queries", part2)
    common = [r for r in next(iter(part2.values())) if r != "auto_depth" and all(r in v for v in part2.values())]
    means = {r: sum(v[r] for v in part2.values()) / len(part2) for r in common}
    best = max(means, key=means.get)
    print(
        f"\npart 2 mean over models: best {best} {means[best]:.3f}; auto {means['auto']:.3f}; "
        f"SEAP's logreg@0 {means['logreg@0']:.3f}; centroid@0 {means['centroid@0']:.3f}"
    )


if __name__ == "__main__":
    main()
