"""The device's HTTP API (OpenAI-compatible, plus ``/v1/ask``) and the operator's page.

Modules, one job each::

    engine    EngineHost: the worker (local, or the MQTT daemon's) that HTTP tasks queue on
    app       FastAPI routes, SSE streaming, OpenAI-style errors
    schema    request bodies
    prom      /metrics (Prometheus text) from the shared counters
    security  bind rules, API key, body size limit, CORS
    server    uvicorn; `fieldpack serve --http`
    static/   index.html, the self-contained chat page
"""
