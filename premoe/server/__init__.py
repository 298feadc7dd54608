"""``premoe serve``: an OpenAI-compatible HTTP server over a task server (MoE or dense).

``backend`` (the task-server protocol, prompt rendering), ``engine`` (batched generation),
``scheduler`` (queue, policy, worker), ``app`` (FastAPI endpoints), ``metrics`` (Prometheus) and
``main`` (socket binding, uvicorn, shutdown).
"""
