"""Dense models (SEAP): scores, schedules, GQA rules, bias compensation, exports that vanilla transformers
reloads, routing, re-fit, and bad input. The contract over every dense family row is in
tests/contract/test_dense_family.py."""

import json

import pytest
import torch
from expected import DENSE_REFIT_GAIN

import premoe
from premoe.cli import main
from premoe.core.data import write_jsonl
from premoe.core.options import RefitOptions
from premoe.core.tasks import samples
from premoe.dense.model import inspect_dense, kept_params, prune_in_memory
from premoe.dense.options import DenseSelection
from premoe.dense.patterns import dense_plan
from premoe.dense.router import DenseRouter
from premoe.dense.scoring import attention_units, logistic_shape, pooled, scale_schedule
from premoe.errors import InputError, StoreError
from premoe.testing import build_dense_model


def _build(path, model_type, seed=0, **over):
    return build_dense_model(path, model_type, seed, **over)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("dense-data")
    out = {}
    for t in ("add", "reverse", "sort"):
        out[t] = write_jsonl(d / f"{t}.jsonl", samples(t, 24, "calib"))
        write_jsonl(d / f"{t}-eval.jsonl", samples(t, 8, "eval"))
    return d


def test_bias_compensation_survives_vanilla_reload(tmp_path, data):
    from transformers import AutoModelForCausalLM

    model = _build(tmp_path / "m", "llama")
    premoe.calibrate(model, data / "add.jsonl", "add", tmp_path / "s", progress=False)
    info = inspect_dense(model)
    plan = dense_plan(info, tmp_path / "s", "add", DenseSelection(0.4, method="seap", bias_comp=True))
    assert plan.bias
    premoe.prune(
        model, tmp_path / "s", "add", None, tmp_path / "out", sparsity=0.4, bias_comp=True, refit=False, progress=False
    )
    full = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    x = torch.tensor([[1, 5, 6, 7, 8, 9]])
    assert reloaded.model.layers[0].mlp.down_proj.bias is not None
    assert torch.allclose(reloaded(x).logits, prune_in_memory(full, info, plan)(x).logits, atol=1e-4)
    # a family with no o_proj/down_proj bias flag refuses instead of silently dropping it
    q = _build(tmp_path / "q", "qwen2")
    premoe.calibrate(q, data / "add.jsonl", "add", tmp_path / "qs", progress=False)
    with pytest.raises(InputError, match="`bias_comp=False`"):
        premoe.prune(
            q,
            tmp_path / "qs",
            "add",
            None,
            tmp_path / "qout",
            sparsity=0.4,
            bias_comp=True,
            refit=False,
            progress=False,
        )
    assert not (tmp_path / "qout").exists()


def test_layer_varying_plans_are_written_at_the_requested_sparsity(tmp_path, data):
    """FLAP's adaptive plan differs per layer, so its export is zero-padded to the largest layer:
    premoe prune makes it sparser in memory until the padded checkpoint removes what was asked;
    --count memory (task servers, the papers' count) keeps the in-memory count."""
    from transformers import AutoModelForCausalLM

    model = _build(tmp_path / "m", "llama")
    for t in ("add", "sort"):
        premoe.calibrate(model, data / f"{t}.jsonl", t, tmp_path / "s", progress=False)
    info = inspect_dense(model)
    memory = dense_plan(info, tmp_path / "s", "add", DenseSelection(0.4, method="flap"), written=False)
    written = dense_plan(info, tmp_path / "s", "add", DenseSelection(0.4, method="flap"))
    assert not memory.uniform() and memory.info["sparsity_written"] < 0.4 - 1e-3  # padding gave weights back
    assert abs(written.info["sparsity_written"] - 0.4) < 0.02 and written.info["sparsity"] > 0.4
    res = premoe.prune(
        model, tmp_path / "s", "add", None, tmp_path / "out", sparsity=0.4, method="flap", progress=False
    )
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    n_linear = sum(p.numel() for n, p in reloaded.named_parameters() if n.endswith("proj.weight"))
    assert abs(1 - n_linear / kept_params(info, None) - 0.4) < 0.02 and abs(res.sparsity - 0.4) < 0.02


def test_compensation_bias_takes_the_loaded_dtype(tmp_path, data):
    """A bf16 checkpoint loaded in float32: the biases compensation brings are float32 too (it runs)."""
    from transformers import AutoModelForCausalLM

    model = _build(tmp_path / "m", "llama")
    AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    (tmp_path / "bf16" / "tokenizer.json").write_bytes((model / "tokenizer.json").read_bytes())
    (tmp_path / "bf16" / "tokenizer_config.json").write_bytes((model / "tokenizer_config.json").read_bytes())
    premoe.calibrate(tmp_path / "bf16", data / "add.jsonl", "add", tmp_path / "s", progress=False)
    info = inspect_dense(tmp_path / "bf16")
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    plan = dense_plan(info, tmp_path / "s", "add", DenseSelection(0.4, method="flap"))
    assert plan.bias
    net = prune_in_memory(full, info, plan)
    assert {p.dtype for p in net.parameters()} == {torch.float32}
    assert torch.isfinite(net(torch.tensor([[1, 5, 6, 7]])).logits).all()


def test_sharded_export_reloads_and_reads_back(tmp_path, data):
    """A checkpoint larger than the shard size is written as hub shards with an index; vanilla
    transformers and premoe both read it back."""
    from transformers import AutoModelForCausalLM

    from premoe.core.checkpoint import INDEX_NAME
    from premoe.dense.export import export_dense

    model = _build(tmp_path / "m", "qwen3")
    premoe.calibrate(model, data / "add.jsonl", "add", tmp_path / "s", progress=False)
    info = inspect_dense(model)
    plan = dense_plan(info, tmp_path / "s", "add", 0.3)
    res = export_dense(info, plan, tmp_path / "out", max_shard_bytes=60_000, progress=False)
    shards = sorted((tmp_path / "out").glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "out" / INDEX_NAME).is_file()
    assert sum(p.stat().st_size for p in shards) >= res.bytes_written
    full = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    x = torch.tensor([[1, 5, 6, 7, 8, 9]])
    assert torch.allclose(reloaded(x).logits, prune_in_memory(full, info, plan)(x).logits, atol=1e-5)
    assert inspect_dense(tmp_path / "out").heads == len(plan.heads[0])


def test_statistics_are_exact_and_batch_independent(tmp_path, data):
    """Streaming float64 sums equal brute force over the concatenated real tokens, whatever the batch size."""
    from premoe.dense.calibration import observe_dense
    from premoe.dense.model import load_dense

    model = _build(tmp_path / "m", "llama")
    info, lm, tok = load_dense(model, dtype=torch.float32)
    texts = [r["prompt"] + r["completion"] for r in samples("add", 10, "calib")]
    a, n = observe_dense(lm, info, tok, texts, batch_size=1, progress=False)
    b, m = observe_dense(lm, info, tok, texts, batch_size=7, progress=False)
    assert n == m == sum(len(tok(t).input_ids) for t in texts)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    rows = []
    h = lm.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda _m, args: rows.append(args[0][0]))
    for t in texts:
        lm(**tok(t, return_tensors="pt"))
    h.remove()
    x = torch.cat(rows).double()
    assert torch.allclose(a["down.mean"][1].double(), x.mean(0), atol=1e-5)
    assert torch.allclose(a["down.var"][1].double(), x.var(0, unbiased=False), atol=1e-5, rtol=1e-3)


def test_scores_rank_as_their_formulas_and_the_cli_lists_them():
    from premoe.dense.options import SCORE_NAMES
    from premoe.dense.scoring import METRICS, channel_scores

    assert SCORE_NAMES == tuple(METRICS)
    # channel 0: large variance, small norm; channel 1: large mean, no variance; channel 2: heavy weights
    m = {
        "o.var": torch.tensor([[4.0, 0.0, 1.0]]),
        "o.sq": torch.tensor([[4.0, 9.0, 1.0]]),
        "w.o.l2sq": torch.tensor([[1.0, 1.0, 9.0]]),
        "w.o.l1mean": torch.tensor([[1.0, 1.0, 3.0]]),
    }
    assert channel_scores(m, "o", "sf").tolist() == [[4.0, 0.0, 9.0]]  # var x ||w||^2
    assert channel_scores(m, "o", "sw").tolist() == [[2.0, 3.0, 3.0]]  # rms x mean|w|
    assert channel_scores(m, "o", "sw-paper").tolist() == [[4.0, 9.0, 3.0]]  # E[x^2] x ||w||_1 (/D)
    assert channel_scores(m, "o", "sw-code").tolist() == [[2.0, 3.0, 9.0]]  # rms x ||w||^2
    with pytest.raises(InputError, match="unknown score"):
        channel_scores(m, "o", "l3")


def test_gqa_units_keep_groups_valid():
    heads = torch.tensor([5.0, 1, 3, 2, 8, 0, 4, 7])  # 8 query heads, 2 KV groups of 4
    units = attention_units(heads, 2, whole_groups=False)
    assert [sorted(u[1]) for u in units[:2]] == [[0, 4], [2, 7]] and all(u[2] == [] for u in units)
    groups = attention_units(heads, 2, whole_groups=True)
    assert groups[0][1] == [4, 5, 6, 7] and groups[0][2] == [1]
    mha = attention_units(heads, 8, whole_groups=False)  # MHA: a unit is a head with its KV head
    assert mha[0][1] == [4] and mha[0][2] == [4]


def test_logistic_schedule_mean_and_protection():
    shape = logistic_shape(32)
    assert shape[:2].eq(0).all() and shape[-2:].eq(0).all() and (shape[2:-2] > 0).all()
    rho = scale_schedule(shape, 0.2)
    assert abs(float(rho.mean()) - 0.2) < 1e-4 and float(rho[29]) > float(rho[2])
    with pytest.raises(InputError):
        scale_schedule(logistic_shape(4), 0.6)


def test_pooled_statistics_weight_tasks_equally():
    a = {
        "o.mean": torch.zeros(1, 2),
        "o.sq": torch.ones(1, 2),
        "down.mean": torch.zeros(1, 2),
        "down.sq": torch.ones(1, 2),
    }
    b = {
        "o.mean": torch.full((1, 2), 2.0),
        "o.sq": torch.full((1, 2), 5.0),
        "down.mean": torch.zeros(1, 2),
        "down.sq": torch.ones(1, 2),
    }
    p = pooled([a, b])
    # mixture of N(0,1) and N(2,1): mean 1, variance 1 + 1
    assert torch.allclose(p["o.mean"], torch.ones(1, 2)) and torch.allclose(p["o.var"], torch.full((1, 2), 2.0))


def test_routing_and_generate(tmp_path, data, capsys):
    model = _build(tmp_path / "m", "llama")
    for t in ("add", "reverse", "sort"):
        premoe.calibrate(model, data / f"{t}.jsonl", t, tmp_path / "s", progress=False)
    router = DenseRouter(model, tmp_path / "s", 0)
    assert router.bytes_read < inspect_dense(model).checkpoint.nbytes / 2
    # a router cut to k layers computes the same feature the full model stored at depth k (no final norm)
    from premoe.dense.calibration import prompt_features
    from premoe.dense.model import load_dense

    info, full, tok = load_dense(model, dtype="float32")
    texts = [r["prompt"] for r in samples("sort", 4, "eval")]
    ref = prompt_features(full, info, tok, texts)
    for k in (1, 2, info.num_layers):
        assert torch.allclose(DenseRouter(model, tmp_path / "s", k).features(texts), ref[:, k], atol=1e-5), k
    res = router.route_many([r["prompt"] for r in samples("add", 5, "eval")])
    assert all(r.task == "add" for r in res)  # the prompt format alone separates these tasks at the embeddings
    assert (
        main(
            [
                "-q",
                "generate",
                "--model",
                str(model),
                "--store",
                str(tmp_path / "s"),
                "--sparsity",
                "0.3",
                "--json",
                "--max-new-tokens",
                "3",
                "add 1+2=",
            ]
        )
        == 0
    )
    reply = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert reply["task"] == "add" and reply["switched"]


def test_bad_input_one_line_errors(tmp_path, capsys, data):
    model, store = _build(tmp_path / "m", "llama"), tmp_path / "store"
    premoe.calibrate(model, data / "add.jsonl", "add", store, progress=False)
    cases = [
        (
            [
                "prune",
                "--model",
                str(model),
                "--store",
                str(store),
                "--task",
                "add",
                "--sparsity",
                "1.0",
                "--out",
                str(tmp_path / "o"),
            ],
            "[0, 1)",
        ),
        (
            [
                "prune",
                "--model",
                str(model),
                "--store",
                str(store),
                "--task",
                "add",
                "--sparsity",
                "-0.1",
                "--out",
                str(tmp_path / "o"),
            ],
            "[0, 1)",
        ),
        (
            [
                "prune",
                "--model",
                str(model),
                "--store",
                str(store),
                "--task",
                "add",
                "--keep",
                "4",
                "--out",
                str(tmp_path / "o"),
            ],
            "--keep does not apply to dense models",
        ),
        (
            ["prune", "--model", str(model), "--store", str(store), "--task", "add", "--out", str(tmp_path / "o")],
            "--sparsity",
        ),
        (
            [
                "prune",
                "--model",
                str(model),
                "--store",
                str(store),
                "--task",
                "add",
                "--sparsity",
                "0.99",
                "--out",
                str(tmp_path / "o"),
            ],
            "lower --sparsity",
        ),
        (
            [
                "calibrate",
                "--model",
                str(model),
                "--data",
                str(data / "add.jsonl"),
                "--task",
                "x",
                "--store",
                str(tmp_path / "s2"),
                "--scorer",
                "reap",
            ],
            "--scorer does not apply to dense models",
        ),
    ]
    for argv, msg in cases:
        assert main(["-q", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and msg in err, (argv, err)
        assert not (tmp_path / "o").exists()
    # a dense store used with another model
    other = _build(tmp_path / "other", "llama", seed=1)
    with pytest.raises(StoreError, match="another model"):
        premoe.prune(other, store, "add", None, tmp_path / "o", sparsity=0.3, progress=False)


def test_moe_flag_refused_on_dense_and_reverse(tmp_path, capsys):
    from premoe.assets import TINY_MODEL

    assert (
        main(
            [
                "-q",
                "prune",
                "--model",
                str(TINY_MODEL),
                "--store",
                str(tmp_path / "s"),
                "--task",
                "add",
                "--keep",
                "8",
                "--sparsity",
                "0.5",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "--sparsity does not apply to MoE models" in capsys.readouterr().err


def test_dense_sweep_compares_methods_on_one_structure_when_asked(tmp_path):
    """premoe sweep on the shipped dense model: each method's own allocation by default (FLAP:
    adaptive), one allocation for all with schedule=; results and picture written."""
    from premoe.assets import TINY_DENSE, TINY_MODEL
    from premoe.verbs.sweep import sweep

    tasks = {t: (samples(t, 16, "calib"), samples(t, 10, "eval")) for t in ("add", "sort")}
    own = sweep(
        tmp_path / "own", model=TINY_DENSE, tasks=tasks, sparsities=[0.3], methods=["seap", "flap"], progress=False
    )
    same = sweep(
        tmp_path / "same",
        model=TINY_DENSE,
        tasks=tasks,
        sparsities=[0.3],
        methods=["seap", "flap"],
        progress=False,
        schedule="uniform",
    )
    assert {r["schedule"] for r in own["rows"] if r["method"] == "flap"} == {"adaptive"}
    assert own["methods"] == ["seap", "seap+refit", "flap", "flap+refit"] and own["routing"]["method"] == "seap+refit"
    assert {r["schedule"] for r in same["rows"]} == {"uniform"} and same["schedule"] == "uniform"
    assert all(abs(r["sparsity_counted"] - 0.3) < 0.02 for r in same["summary"])
    assert (tmp_path / "same" / "results.json").exists() and (tmp_path / "same" / "results.csv").exists()
    with pytest.raises(InputError, match="does not apply to MoE models"):
        sweep(tmp_path / "moe", model=TINY_MODEL, tasks=tasks, schedule="uniform", progress=False)


def test_head_energy_is_exact_and_feeds_the_uniform_split():
    """o.head_sq is sum_n ||W_h x_h||^2 per head (brute force), pooled as the tasks' mean; the head
    perturbation uses it (minus the removed mean output when compensated), and falls back to the
    diagonal estimate for stores without it."""
    from premoe.dense.calibration import head_energy
    from premoe.dense.scoring import head_perturbation, head_scores, perturbation

    g = torch.Generator().manual_seed(0)
    H, d, D, N = 4, 8, 16, 50
    x, w = torch.randn(N, H * d, generator=g), torch.randn(D, H * d, generator=g)
    brute = torch.stack([((x[:, h * d : (h + 1) * d] @ w[:, h * d : (h + 1) * d].T) ** 2).sum() for h in range(H)])
    assert torch.allclose(head_energy(x, w, H).float(), brute, rtol=1e-4)
    means = {
        "o.head_sq": (brute / N)[None],
        "o.mean": x.mean(0)[None],
        "o.sq": (x * x).mean(0)[None],
        "o.var": x.var(0, unbiased=False)[None],
        "w.o.l2sq": (w * w).sum(0)[None],
    }
    assert torch.allclose(head_perturbation(means, d, False), (brute / N)[None])
    centred = (
        torch.stack(
            [(((x - x.mean(0))[:, h * d : (h + 1) * d] @ w[:, h * d : (h + 1) * d].T) ** 2).sum() for h in range(H)]
        )
        / N
    )
    assert torch.allclose(head_perturbation(means, d, True, lambda l, s: w), centred[None], rtol=1e-3)
    old = {k: v for k, v in means.items() if k != "o.head_sq"}
    assert torch.allclose(head_perturbation(old, d, False), head_scores(perturbation(old, "o", False), d))
    both = pooled(
        [
            {**means, "down.mean": means["o.mean"], "down.sq": means["o.sq"]},
            {**means, "o.head_sq": 3 * means["o.head_sq"], "down.mean": means["o.mean"], "down.sq": means["o.sq"]},
        ]
    )
    assert torch.allclose(both["o.head_sq"], 2 * means["o.head_sq"])


def test_refit_is_least_squares():
    """solve_refit: the kept columns and bias minimising the output error on the Gram's tokens; an
    input column that is an affine function of kept ones is taken over exactly (plain slicing is not)."""
    from premoe.dense.refit import solve_refit

    gen = torch.Generator().manual_seed(0)
    n, D = 4000, 6
    base = torch.randn(n, 8, generator=gen, dtype=torch.float64)
    x = torch.cat(
        [base, base[:, :4] @ torch.randn(4, 4, generator=gen, dtype=torch.float64) + 0.5], 1
    )  # 8..11 affine in 0..3
    w = torch.randn(D, 12, generator=gen, dtype=torch.float64)
    xa = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    g = xa.T @ xa / n
    y = x @ w.T
    kept = list(range(8))
    wk, b = solve_refit(w, g, kept, ridge=0.0)
    err_refit = ((x[:, kept] @ wk.double().T + b.double() - y) ** 2).mean()
    err_plain = ((x[:, kept] @ w[:, kept].T - y) ** 2).mean()
    assert err_plain > 0.1 and err_refit < 1e-6 * err_plain
    wk_nb, none = solve_refit(w, g, kept, fit_bias=False, ridge=0.0)
    assert none is None and wk_nb.shape == (D, 8)
    with pytest.raises(InputError, match="does not match"):
        solve_refit(w, g[:5, :5], kept)


def test_refit_raises_accuracy_and_survives_vanilla_reload(tmp_path, capsys):
    """On the shipped dense model (tasks really learned), --refit at 50% keeps far more held-out
    accuracy than the plain slice; the export reloads in plain transformers to the same logits as the
    re-fitted plan in memory, records the re-fit in its premoe block, and bad refit input fails early."""
    from transformers import AutoModelForCausalLM

    from premoe.assets import TINY_DENSE
    from premoe.core.config import load_tokenizer
    from premoe.core.evaluation import exact_match

    calib = write_jsonl(tmp_path / "add.jsonl", samples("add", 64, "calib"))
    ev = samples("add", 40, "eval")
    premoe.calibrate(TINY_DENSE, calib, "add", tmp_path / "s", progress=False)
    info = inspect_dense(TINY_DENSE)
    plain = dense_plan(info, tmp_path / "s", "add", 0.5)
    fitted = dense_plan(info, tmp_path / "s", "add", 0.5, refit=RefitOptions(True), progress=False)
    assert fitted.heads == plain.heads and fitted.channels == plain.channels and fitted.refit and fitted.bias
    full = AutoModelForCausalLM.from_pretrained(TINY_DENSE, dtype=torch.float32)
    tok = load_tokenizer(TINY_DENSE)
    acc_plain = exact_match(prune_in_memory(full, info, plain), tok, ev, progress=False)
    acc_fit = exact_match(prune_in_memory(full, info, fitted), tok, ev, progress=False)
    assert acc_fit >= acc_plain + DENSE_REFIT_GAIN, (acc_plain, acc_fit)

    # on by default while the recorded calibration data is there
    prune = ["-q", "prune", "--model", str(TINY_DENSE), "--store", str(tmp_path / "s"), "--task", "add"]
    prune += ["--sparsity", "0.5"]
    assert main([*prune, "--out", str(tmp_path / "out")]) == 0
    assert "re-fitted" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["premoe"]["refit"]["bias"] == {"o": True, "down": True} and cfg["premoe"]["bias_comp"] is False
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    x = torch.tensor([tok("add 12+34=")["input_ids"]])
    # the same model up to the export's bf16 rounding of the fitted biases
    assert torch.allclose(reloaded(x).logits, prune_in_memory(full, info, fitted)(x).logits, atol=5e-3)

    # bad input: one line, before any work, nothing written
    out = tmp_path / "bad"
    assert main([*prune, "--refit-data", str(calib), "--no-refit", "--out", str(out)]) == 2
    assert "cannot go with --no-refit" in capsys.readouterr().err
    calib.write_text(calib.read_text() + json.dumps({"prompt": "add 1+1=", "completion": "2"}) + "\n")
    assert main([*prune, "--refit", "--out", str(out)]) == 2
    assert "changed since calibration; pass --refit-data" in capsys.readouterr().err
    calib.unlink()
    assert main([*prune, "--refit", "--out", str(out)]) == 2
    assert "is gone; pass --refit-data" in capsys.readouterr().err
    assert not out.exists()
    # without --refit the default warns and keeps the plain slice
    assert main([*prune, "--out", str(tmp_path / "plain")]) == 0
    assert "not re-fitted: task 'add'" in capsys.readouterr().out
    assert "refit" not in json.loads((tmp_path / "plain" / "config.json").read_text())["premoe"]
