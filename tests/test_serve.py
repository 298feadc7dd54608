"""``premoe serve``: the OpenAI-compatible server, driven by the real ``openai`` client on a free
loopback port, on the shipped tiny MoE and tiny dense models."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

import premoe
from premoe.assets import TINY_DENSE
from premoe.assets import TINY_MODEL as TINY_MOE
from premoe.core.data import write_jsonl
from premoe.core.evaluation import generate_greedy
from premoe.core.tasks import samples
from premoe.server.app import ServeOptions
from premoe.server.engine import Sampling, Sequence, run_batch
from premoe.server.main import bind, make_server, url_of
from premoe.server.scheduler import POLICIES, Job, QueueFull, Scheduler

MOE_TASKS = ("add", "reverse", "sort")
DENSE_TASKS = ("add", "sort")
KEY = "test-key"


def _store(tmp_path_factory, model, tasks, name):
    d = tmp_path_factory.mktemp(name)
    for t in tasks:
        premoe.calibrate(model, write_jsonl(d / f"{t}.jsonl", samples(t, 24, "calib")), t, d / "store", progress=False)
    return d / "store"


@pytest.fixture(scope="module")
def moe_store(tmp_path_factory):
    return _store(tmp_path_factory, TINY_MOE, MOE_TASKS, "moe")


@pytest.fixture(scope="module")
def dense_store(tmp_path_factory):
    return _store(tmp_path_factory, TINY_DENSE, DENSE_TASKS, "dense")


@contextlib.contextmanager
def running(backend, **opts):
    """The server on a free 127.0.0.1 port, in a thread; yields (base url, uvicorn server, service)."""
    sock = bind("127.0.0.1", 0)
    server = make_server(backend, ServeOptions(**opts), sock, drain_seconds=30)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield url_of(sock), server, server.config.app.service
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def moe_backend(moe_store):
    from premoe.moe.server import TaskServer

    srv = TaskServer(TINY_MOE, moe_store, 8)
    srv.load(srv.tasks[0])
    return srv


@pytest.fixture(scope="module")
def moe(moe_backend):
    with running(moe_backend, api_key=KEY) as (url, server, svc):
        yield url, svc


def client(url, key=KEY):  # the openai client insists on a key; keyless servers ignore it
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def reference(backend, task, prompt, max_tokens):
    """What ``premoe generate`` answers for ``prompt`` with ``task``'s pattern resident."""
    backend.load(task)
    return generate_greedy(backend.model, backend.tokenizer, [prompt], max_tokens)[0]


def test_models_lists_auto_and_every_task(moe):
    url, _ = moe
    ids = [m.id for m in client(url).models.list().data]
    assert ids == ["auto", *sorted(MOE_TASKS)]
    assert client(url).models.retrieve("sort").id == "sort"


def test_auto_routing_answers_as_premoe_generate_does(moe, moe_backend):
    url, svc = moe
    c = client(url)
    asked = [(t, r["prompt"]) for t in MOE_TASKS for r in samples(t, 3, "eval")]
    got = []
    for task, prompt in asked:
        raw = c.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": prompt}], max_tokens=24, temperature=0
        )
        out = raw.parse()
        info = out.model_extra["premoe"]
        assert info["task"] == task and info["selection"] == "routed"
        assert raw.headers["x-premoe-task"] == task and float(raw.headers["x-premoe-margin"]) == pytest.approx(
            info["margin"], rel=1e-5
        )
        assert out.usage.prompt_tokens == len(moe_backend.tokenizer(prompt)["input_ids"])
        assert out.usage.completion_tokens >= 1 and out.choices[0].finish_reason == "stop"
        got.append((task, prompt, out.choices[0].message.content))
    for task, prompt, text in got:  # after the server is idle: the same pattern, loaded alone, answers the same
        assert text == reference(moe_backend, task, prompt, 24)
    assert svc.scheduler.switches >= len(MOE_TASKS) - 1


def test_pinned_task_is_used_even_for_another_task_s_prompt(moe):
    url, _ = moe
    prompt = samples("add", 1, "eval")[0]["prompt"]
    out = client(url).completions.create(model="reverse", prompt=prompt, max_tokens=8, temperature=0)
    assert out.model_extra["premoe"]["task"] == "reverse" and out.model_extra["premoe"]["selection"] == "pinned"
    assert (
        out.object == "text_completion"
        and out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    )


def test_streaming_equals_the_whole_answer_and_ends_with_done(moe):
    url, _ = moe
    c = client(url)
    prompt = samples("reverse", 1, "eval")[0]["prompt"]
    msgs = [{"role": "user", "content": prompt}]
    whole = c.chat.completions.create(model="auto", messages=msgs, max_tokens=24, temperature=0)
    chunks = list(
        c.chat.completions.create(
            model="auto",
            messages=msgs,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    with httpx.stream(
        "POST",
        url + "/v1/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": "auto", "prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": True},
    ) as r:
        lines = [ln for ln in r.iter_lines() if ln]
        assert r.headers["content-type"].startswith("text/event-stream") and r.headers["x-premoe-task"] == "reverse"
    assert lines[-1] == "data: [DONE]"
    assert "".join(json.loads(ln[6:])["choices"][0]["text"] for ln in lines[:-1]) == whole.choices[0].message.content


def test_sampling_settings(moe):
    url, _ = moe
    c = client(url)
    msgs = [{"role": "user", "content": samples("sort", 1, "eval")[0]["prompt"]}]
    a = c.chat.completions.create(model="auto", messages=msgs, max_tokens=12, temperature=1.5, seed=7)
    b = c.chat.completions.create(model="auto", messages=msgs, max_tokens=12, temperature=1.5, seed=7)
    assert a.choices[0].message.content == b.choices[0].message.content  # seeded sampling repeats
    short = c.chat.completions.create(model="auto", messages=msgs, max_tokens=2, temperature=0)
    assert short.usage.completion_tokens == 2 and short.choices[0].finish_reason == "length"
    full = (
        c.chat.completions.create(model="auto", messages=msgs, max_tokens=12, temperature=0).choices[0].message.content
    )
    stop = full[1]
    cut = c.chat.completions.create(model="auto", messages=msgs, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    extra = c.chat.completions.create(
        model="auto",
        messages=msgs,
        max_tokens=12,
        temperature=0,
        extra_body={"no_such_field": 1, "frequency_penalty": 0},
    )
    assert extra.choices[0].message.content == full  # unknown fields are ignored, as OpenAI does


@pytest.mark.parametrize(
    "kwargs,status,code",
    [
        (dict(model="nope"), 404, "model_not_found"),
        (dict(messages=[]), 400, None),
        (dict(messages=[{"role": "user", "content": "   "}]), 400, None),
        (dict(max_tokens=0), 400, None),
        (dict(max_tokens=100000), 400, "context_length_exceeded"),
        (dict(messages=[{"role": "user", "content": "add 1+1=" * 40}]), 400, "context_length_exceeded"),
        (dict(n=2), 400, None),
        (dict(temperature=5), 400, None),
        (dict(extra_body={"max_tokens": "many"}), 400, None),
        (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400, None),
    ],
)
def test_client_mistakes_get_openai_shaped_4xx(moe, kwargs, status, code):
    url, _ = moe
    body = dict(model="auto", messages=[{"role": "user", "content": "add 1+2="}], max_tokens=4)
    body.update(kwargs)
    with pytest.raises(openai.APIStatusError) as e:
        client(url).chat.completions.create(**body)
    assert e.value.status_code == status
    err = e.value.body
    assert set(err) >= {"message", "type", "code"} and err["message"] and (code is None or err["code"] == code)


def test_raw_http_errors_and_auth(moe):
    url, _ = moe
    auth = {"Authorization": f"Bearer {KEY}"}
    for body in (b"{not json", b"[1, 2]", b'{"model": "auto"}'):
        r = httpx.post(url + "/v1/chat/completions", content=body, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["message"]
    big = httpx.post(url + "/v1/completions", headers=auth, json={"model": "auto", "prompt": "x" * (2 << 20)})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    assert httpx.get(url + "/v1/nothing", headers=auth).status_code == 404
    health = httpx.get(url + "/health")  # no key needed
    assert health.status_code == 200 and health.json()["held"] == [health.json()["task"]]
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(url + "/metrics", headers=headers).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(url, "wrong").models.list()


def test_metrics_count_requests_tokens_switches_and_bytes(moe):
    url, _ = moe
    c = client(url)
    for t in MOE_TASKS:
        c.completions.create(model=t, prompt=samples(t, 1, "eval")[0]["prompt"], max_tokens=4, temperature=0)
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    values = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}
    assert values['premoe_requests_total{endpoint="/v1/completions",status="200"}'] >= 3
    assert values["premoe_pattern_switches_total"] >= 2 and values["premoe_checkpoint_bytes_read_total"] > 0
    assert values["premoe_completion_tokens_total"] >= 3 and values["premoe_prompt_tokens_total"] > 0
    assert "premoe_queue_depth" in values and values["premoe_request_latency_seconds_count"] >= 3


def test_dense_model_is_served_the_same_way(dense_store):
    from premoe.dense.server import DenseServer

    backend = DenseServer(TINY_DENSE, dense_store, 0.3)
    backend.load(backend.tasks[0])
    with running(backend) as (url, _, svc):
        c = client(url)
        assert [m.id for m in c.models.list().data] == ["auto", *sorted(DENSE_TASKS)]
        answers = []
        for t in DENSE_TASKS:
            for r in samples(t, 2, "eval"):
                out = c.chat.completions.create(
                    model="auto", messages=[{"role": "user", "content": r["prompt"]}], max_tokens=16, temperature=0
                )
                assert out.model_extra["premoe"]["task"] == t
                answers.append((t, r["prompt"], out.choices[0].message.content))
    for t, prompt, text in answers:
        assert text == reference(backend, t, prompt, 16)


@contextlib.contextmanager
def slow_backend(store, seconds: float):
    """A fresh MoE task server whose every forward takes at least ``seconds`` (a stand-in for a large
    model, so requests overlap)."""
    from premoe.moe.server import TaskServer

    backend = TaskServer(TINY_MOE, store, 8)
    backend.load(backend.tasks[0])
    hook = backend.model.register_forward_hook(lambda *a: time.sleep(seconds))
    try:
        yield backend
    finally:
        hook.remove()


def test_concurrent_mixed_requests_batch_by_task_and_never_cross_patterns(moe_store):
    asked = [(t, r["prompt"]) for i in range(4) for t in MOE_TASKS for r in samples(t, 4, "eval")[i : i + 1]]
    with slow_backend(moe_store, 0.01) as backend, running(backend, max_batch=8) as (url, _, svc):
        c = client(url, "no-key")
        results = [None] * len(asked)

        def ask(i):
            t, p = asked[i]
            out = c.completions.create(model="auto", prompt=p, max_tokens=12, temperature=0)
            results[i] = (out.model_extra["premoe"]["task"], out.choices[0].text)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asked))]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        switches, batches = svc.scheduler.switches, svc.metrics.batches.collect()[0]
    assert all(r is not None for r in results)
    assert [r[0] for r in results] == [t for t, _ in asked]  # each answered by its own task's pattern
    for (t, p), (_, text) in zip(asked, results):
        assert text == reference(backend, t, p, 12)
    count = next(s.value for s in batches.samples if s.name.endswith("_count"))
    assert count < len(asked) and switches < len(asked)  # requests were batched, patterns not thrashed


def test_client_disconnect_cancels_its_generation(moe_store):
    with slow_backend(moe_store, 0.05) as backend, running(backend) as (url, _, svc):
        with httpx.stream(
            "POST",
            url + "/v1/completions",
            json={"model": "reverse", "prompt": "x", "max_tokens": 60, "temperature": 1.0, "stream": True},
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    break  # first chunk read: hang up
        deadline = time.monotonic() + 20
        while not svc.scheduler.history and time.monotonic() < deadline:
            time.sleep(0.05)
        job = svc.scheduler.history[-1]
    assert job.finish_reason == "cancelled" and job.completion_tokens < 60


def test_shutdown_drains_in_flight_requests(moe_store):
    result = {}
    with slow_backend(moe_store, 0.05) as backend, running(backend) as (url, server, svc):

        def ask():
            result["out"] = client(url, "no-key").completions.create(
                model="reverse", prompt="reverse abcdef=", max_tokens=20, temperature=0
            )

        th = threading.Thread(target=ask)
        th.start()
        deadline = time.monotonic() + 20
        while svc.metrics.running._value.get() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.should_exit = True  # what uvicorn's SIGTERM handler does
        th.join(30)
    choice = result["out"].choices[0]  # the whole answer, not one cut off by the shutdown
    assert choice.finish_reason == "stop"
    assert choice.text == reference(backend, "reverse", "reverse abcdef=", 20) == "fedcba"


def test_full_queue_answers_503_with_retry_after(moe_store):
    statuses = []
    with slow_backend(moe_store, 0.05) as backend, running(backend, max_queue=1, max_batch=1) as (url, _, _svc):

        def ask():
            r = httpx.post(
                url + "/v1/completions",
                timeout=60,
                json={"model": "reverse", "prompt": "reverse abc=", "max_tokens": 8, "temperature": 0},
            )
            statuses.append((r.status_code, r.headers.get("retry-after"), r.json()))

        threads = [threading.Thread(target=ask) for _ in range(5)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
    full = [x for x in statuses if x[0] == 503]
    assert full and all(x[1] == "1" and x[2]["error"]["code"] == "queue_full" for x in full)
    assert len(statuses) == 5 and any(x[0] == 200 for x in statuses) and all(x[0] in (200, 503) for x in statuses)


def test_chat_template_is_applied_and_routed_as_the_model_sees_it(moe_store):
    """A tokenizer with a chat template: the prompt the model sees (and routes on) is the template's,
    with the generation prompt; special tokens it holds are not added twice."""
    from premoe.moe.server import TaskServer
    from premoe.server.backend import encode, render_chat

    backend = TaskServer(TINY_MOE, moe_store, 8)
    tok = backend.tokenizer
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"
    )
    try:
        msgs = [{"role": "user", "content": "add 2+3"}]
        text, templated = render_chat(tok, msgs)
        assert templated and text == tok.bos_token + "add 2+3="
        assert encode(tok, text, templated) == tok("add 2+3=")["input_ids"]  # one BOS, from the template
        backend.load(backend.tasks[0])
        with running(backend) as (url, _, _svc):
            out = client(url, "no-key").chat.completions.create(
                model="auto", messages=msgs, max_tokens=4, temperature=0
            )
        assert out.model_extra["premoe"]["task"] == "add" and out.choices[0].message.content == "5"
    finally:
        tok.chat_template = None


# -- pure parts: engine and scheduler ----------------------------------------------------------
def test_engine_cancellation_and_stop_strings(moe_backend):
    backend = moe_backend
    backend.load("reverse")
    tok = backend.tokenizer
    prompt = tok(samples("reverse", 1, "eval")[0]["prompt"])["input_ids"]
    full = Sequence(prompt, Sampling(20, 0.0))
    run_batch(backend.model, tok, [full])
    steps = []
    cancelled = Sequence(prompt, Sampling(20, 0.0), emit=steps.append, is_cancelled=lambda: len(steps) >= 2)
    stopped = Sequence(prompt, Sampling(20, 0.0, stop=(full.text[2:4],)))
    run_batch(backend.model, tok, [cancelled, stopped])
    assert cancelled.finish_reason == "cancelled" and len(cancelled.out_ids) == 2
    assert stopped.text == full.text[:2] and stopped.finish_reason == "stop"

    def wrong():
        raise RuntimeError("resident pattern changed")

    with pytest.raises(RuntimeError):
        run_batch(backend.model, tok, [Sequence(prompt, Sampling(4, 0.0))], check=wrong)


def test_usage_counts_the_end_of_sequence_token_as_vllm_does(moe_backend):
    """A sequence that ends on an end-of-sequence token generated it: usage counts it (as vLLM and OpenAI do),
    the text leaves it out; one stopped by ``max_tokens`` counts exactly ``max_tokens``."""
    from premoe.server.engine import advance

    tok = moe_backend.tokenizer
    eos = {tok.eos_token_id}
    ids = tok("abc", add_special_tokens=False)["input_ids"]
    ended = Sequence([1], Sampling(10, 0.0))
    for t in [*ids, *eos]:
        advance(ended, t, tok, eos)
    assert ended.finish_reason == "stop" and ended.out_ids == ids and ended.text == "abc"
    assert ended.completion_tokens == len(ids) + 1
    cut = Sequence([1], Sampling(2, 0.0))
    for t in ids[:2]:
        advance(cut, t, tok, eos)
    assert cut.finish_reason == "length" and cut.completion_tokens == 2
    on = Sequence([1], Sampling(3, 0.0, ignore_eos=True))  # vLLM's ignore_eos: the end-of-sequence token is a token
    for t in [ids[0], *eos, ids[1]]:
        advance(on, t, tok, eos)
    assert on.finish_reason == "length" and on.completion_tokens == 3 and on.text == "ab"


def test_ignore_eos_generates_max_tokens_as_vllm_does(moe):
    """``ignore_eos`` (vLLM's extension, sent by benchmark clients for fixed-length loads): every request
    generates exactly ``max_tokens``; the answer up to the end-of-sequence token is the usual one."""
    url, _ = moe
    c = client(url)
    prompt = samples("add", 1, "eval")[0]["prompt"]
    usual = c.completions.create(model="add", prompt=prompt, max_tokens=24, temperature=0)
    assert usual.choices[0].finish_reason == "stop" and usual.usage.completion_tokens < 24
    fixed = c.completions.create(
        model="add", prompt=prompt, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
    )
    assert fixed.choices[0].finish_reason == "length" and fixed.usage.completion_tokens == 24
    assert fixed.choices[0].text.startswith(usual.choices[0].text)


@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_engine_continuous_batching_joins_without_changing_answers(kind, moe_backend, dense_store):
    """Sequences admitted into a running batch (different prompt lengths, joining at different steps)
    produce exactly their standalone greedy completions."""
    from premoe.dense.server import DenseServer

    backend = moe_backend if kind == "moe" else DenseServer(TINY_DENSE, dense_store, 0.3)
    backend.load("sort")
    tok = backend.tokenizer
    prompts = [r["prompt"] for r in samples("sort", 6, "eval")]
    alone = [generate_greedy(backend.model, tok, [p], 16)[0] for p in prompts]
    waiting = [Sequence(tok(p)["input_ids"], Sampling(16, 0.0)) for p in prompts]
    first, rest = waiting[:2], waiting[2:]
    calls = []

    def admit(room):
        calls.append(room)
        return [rest.pop(0)] if rest and len(calls) % 2 else []  # one newcomer every other step

    run_batch(backend.model, tok, first, admit=admit, max_batch=3)
    assert not rest and max(calls) <= 3 and min(calls) >= 1  # asked only while there is room
    assert [s.text for s in waiting] == alone


class _Fake:
    """A backend that only records which task is resident (for scheduling decisions)."""

    def __init__(self):
        self.task, self.model = None, object()


def _simulate(policy: str, order: list[str], max_batch: int = 4) -> int:
    """Switches when ``order`` (all queued at once) is served under ``policy``."""
    backend = _Fake()
    s = Scheduler(backend, policy=policy, max_batch=max_batch, max_wait=60)
    s.pending = [Job("", [], Sampling(1), lambda *a: None, task=t) for t in order]
    switches = 0
    while s.pending:
        batch = s._pick()
        assert batch and len({j.task for j in batch}) == 1 and len(batch) <= max_batch
        if backend.task != batch[0].task:
            backend.task, switches = batch[0].task, switches + 1
        for j in batch:
            s.pending.remove(j)
    return switches


def test_affinity_switches_far_less_than_fcfs_on_a_mixed_stream():
    order = ["a", "b", "c"] * 8
    assert _simulate("fcfs", order) == len(order)
    assert _simulate("affinity", order) == 3  # one switch per task: its two batches of 4 run back to back
    assert set(POLICIES) == {"affinity", "fcfs"}


def test_affinity_bounds_waiting():
    backend = _Fake()
    backend.task = "a"
    s = Scheduler(backend, policy="affinity", max_wait=0.5)
    old = Job("", [], Sampling(1), lambda *a: None, task="b", arrived=time.monotonic() - 1.0)
    s.pending = [old, Job("", [], Sampling(1), lambda *a: None, task="a")]
    assert s._pick() == [old]  # b waited past max_wait: its turn, although a is resident


def test_affinity_switches_for_a_much_fuller_batch_only():
    backend = _Fake()
    backend.task = "a"
    s = Scheduler(backend, policy="affinity", max_batch=8, max_wait=60)
    job = lambda t: Job("", [], Sampling(1), lambda *a: None, task=t)  # noqa: E731
    s.pending = [job("b")] * 8 + [job("a")] * 2
    assert {j.task for j in s._pick()} == {"a"}  # 2 of a against 8 of b: a quarter, stay
    s.pending = [job("b")] * 8 + [job("a")]
    assert {j.task for j in s._pick()} == {"b"}  # 1 against 8: switch to the full batch


def test_affinity_drains_a_thin_batch_at_full_width():
    """Once another task has far more waiting, only joiners that end within the running batch's longest
    sequence join (they cost no extra steps); the rest wait, so the batch drains and the switch comes."""
    backend = _Fake()
    backend.task = "a"
    s = Scheduler(backend, policy="affinity", max_batch=8, max_wait=60)
    short, long = (Job("", [], Sampling(n), lambda *a: None, task="a") for n in (4, 32))
    s.pending = [Job("", [], Sampling(8), lambda *a: None, task="b") for _ in range(7)] + [short, long]
    assert s._joiners("a", room=6, running=1, horizon=10) == [short]  # 7 of b > 2 x (1 running + 2 waiting)
    assert long in s.pending
    assert s._joiners("a", room=6, running=4, horizon=10) == [long]  # 7 of b < 2 x (4 + 1): a stays


class _Routes(_Fake):
    """A backend that routes a whole queue at once, on its own thread (as the vLLM engine's router does)."""

    routes_concurrently = True

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def route_many(self, texts):
        from premoe.core.retrieval import RouteResult
        from premoe.errors import InputError

        self.calls.append((threading.current_thread().name, len(texts)))
        return [InputError("empty") if not t else RouteResult(t, 0.0, None, None, None) for t in texts]


def test_router_thread_routes_queues_at_once_and_fails_bad_ones_alone():
    backend = _Routes()
    s = Scheduler(backend)
    got: dict[str, tuple] = {}
    jobs = [
        Job(t, [], Sampling(1), lambda kind, payload, t=t: got.setdefault(t, (kind, payload)), pinned=p)
        for t, p in (("x", None), ("", None), ("y", None), ("z", "w"))
    ]
    s.pending = list(jobs)
    s._route_waiting()
    assert backend.calls == [(threading.current_thread().name, 3)]  # one call, pinned jobs not routed
    assert [j.task for j in jobs] == ["x", None, "y", "w"]
    assert got == {"": ("error", (400, "empty"))} and jobs[1] not in s.pending
    # started, the router thread routes what arrives, without the worker (never started here)
    s.pending = []
    s.router.start()
    s.submit(Job("q", [], Sampling(1), lambda *a: None))
    deadline = time.monotonic() + 10
    while s.pending[0].task is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert s.pending[0].task == "q" and backend.calls[-1] == ("premoe-router", 1)
    s.pending.clear()
    s.stop(10)
    assert not s.router.is_alive()


def test_router_gathers_arrivals_longer_while_the_worker_has_a_batch_waiting():
    """While the worker generates, a forward per arrival would cost nearly as much per prompt as one per eight:
    arrivals are gathered briefly where the worker may run short of routed requests, longer where a batch of
    them already waits, and not at all for an idle worker, a stopping server or a full batch."""
    from premoe.server.scheduler import COALESCE, DEFER

    s = Scheduler(_Routes(), max_batch=4)
    now = time.monotonic()
    fresh = [Job("x", [], Sampling(1), lambda *a: None, arrived=now)]
    routed = [Job("r", [], Sampling(1), lambda *a: None, task="a") for _ in range(4)]
    assert s._route_in(fresh) == 0.0  # the worker is idle: route at once
    s.busy = True
    s.pending = fresh + routed[:3]  # three routed waiting, four seats: the worker may run short
    assert 0 < s._route_in(fresh) <= COALESCE
    s.pending = fresh + routed  # a whole batch routed and waiting: gather longer
    assert COALESCE < s._route_in(fresh) <= DEFER
    s.backend.task = "b"  # ... but only if they can run: a batch of another task's does not feed the worker
    assert 0 < s._route_in(fresh) <= COALESCE
    s.backend.task = "a"
    assert s._route_in([Job("y", [], Sampling(1), lambda *a: None, arrived=now - DEFER)]) <= 0  # waited enough
    assert s._route_in(fresh * 4) == 0.0  # a full batch to route
    s.stopping = True
    assert s._route_in(fresh) == 0.0


def test_router_thread_routes_gathered_arrivals_once_the_worker_takes_its_batch(monkeypatch):
    """Arrivals gathered while a batch of routed requests waits are routed in one forward, as soon as the worker
    takes that batch (it wakes the router thread), long before ``DEFER`` ends."""
    import premoe.server.scheduler as sched

    backend = _Routes()
    s = Scheduler(backend, max_batch=4)
    s.busy = True
    s.pending = [Job("r", [], Sampling(1), lambda *a: None, task="a") for _ in range(4)]
    monkeypatch.setattr(sched, "DEFER", 30.0)  # far longer than the test: only the worker's wake-up routes them
    try:
        s.router.start()
        for t in ("p", "q"):
            s.submit(Job(t, [], Sampling(1), lambda *a: None))
        time.sleep(0.2)  # well past COALESCE: still gathering, since a batch of routed requests waits
        assert backend.calls == []
        with s.cond:
            s._taken([j for j in s.pending if j.task == "a"])
        deadline = time.monotonic() + 10
        while any(j.task is None for j in s.pending) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert backend.calls == [("premoe-router", 2)] and [j.task for j in s.pending] == ["p", "q"]
    finally:
        s.pending.clear()
        s.stop(10)
    assert not s.router.is_alive()


def test_bounded_queue():
    s = Scheduler(_Fake(), max_queue=2)
    for _ in range(2):
        s.submit(Job("", [], Sampling(1), lambda *a: None))
    with pytest.raises(QueueFull):
        s.submit(Job("", [], Sampling(1), lambda *a: None))


# -- the CLI -----------------------------------------------------------------------------------
def _premoe(*args, **kw):
    return subprocess.run([sys.executable, "-m", "premoe", *args], capture_output=True, text=True, timeout=120, **kw)


def test_cli_refuses_a_store_of_another_model(moe_store):
    r = _premoe("serve", "--model", str(TINY_DENSE), "--store", str(moe_store), "--sparsity", "0.3", "--port", "0")
    assert r.returncode == 2 and r.stderr.startswith("premoe: error:") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_refuses_a_taken_port(moe_store):
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    try:
        r = _premoe("serve", "--model", str(TINY_MOE), "--store", str(moe_store), "--keep", "8", "--port", str(port))
    finally:
        sock.close()
    assert r.returncode == 2 and "--port" in r.stderr and "Traceback" not in r.stderr


def test_cli_serves_and_exits_cleanly_on_sigterm(moe_store):
    env = {**os.environ, "PREMOE_API_KEY": KEY}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "premoe",
            "-q",
            "serve",
            "--model",
            str(TINY_MOE),
            "--store",
            str(moe_store),
            "--keep",
            "8",
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.split("listening on ")[1].split(" ")[0]
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        out = client(url).completions.create(model="auto", prompt="add 2+3=", max_tokens=4, temperature=0)
        assert out.model_extra["premoe"]["task"] == "add"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
