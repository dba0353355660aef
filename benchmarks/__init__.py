"""fieldpack benchmarks: each family measures fieldpack and a baseline in the same run and records ratios.

Run all: ``python -m benchmarks all --out bench/`` (``--quick`` for small sizes); one family:
``python -m benchmarks retrieval --out bench/``. Each family writes ``<family>.json`` and ``<family>.png`` into
the output folder; ``summary.md`` there is rewritten from every family JSON present after each run.

Families (one module each):

* :mod:`benchmarks.quality` — `fieldpack eval` of a Debian-handbook bundle on the shared QA set;
* :mod:`benchmarks.retrieval` — fieldpack index (vector, BM25, hybrid) vs LangChain Chroma + sentence-transformers;
* :mod:`benchmarks.embedder` — ONNX fp32 / int8 vs sentence-transformers on torch;
* :mod:`benchmarks.generation` — ``Runtime.answer`` vs raw llama-cpp-python; decode vs the memory-bandwidth bound;
* :mod:`benchmarks.install` — verify + unpack vs ``sha256sum`` + ``tar -x``; process start to first answer;
* :mod:`benchmarks.compress_bench` — {none, wanda 50%, sparsegpt 2:4, depth, width} x {Q8_0, Q4_K_M, +imatrix};
* :mod:`benchmarks.build_cache` — ``fieldpack build`` cold vs after a docs-only change vs unchanged (stage cache).
* :mod:`benchmarks.http_api` — TTFT and tok/s over the HTTP API vs the Runtime and vs llama_cpp.server.
* :mod:`benchmarks.retrieval_quality` — chunk and page recall@5 / MRR@10 on the unseen parts of the dev QA sets (benchmarks/qa), former vs default ranking, base vs adapted embedder.
* :mod:`benchmarks.retrieval_scale` — vector KNN over 1k / 10k / 13.6k / 100k chunks: float32 exact vs the binary
  layout vs sqlite-vec int8 / bit: latency, recall vs exact search, index bytes; hybrid p50 at 13.6k and 100k.
* :mod:`benchmarks.rerank` — second-stage reranking (a cross-encoder trained on each corpus's own documents, and
  Gemma 3 270M scoring relevance) against the hybrid first stage: page recall@5 / MRR@10 and ms per question.

The MQTT benchmark needs a Mosquitto binary and runs on its own: ``python -m benchmarks.mqtt_bench``.

These are build-host tools (they import builder, torch, chromadb); the ``bench`` extra installs what they need.
"""

FAMILIES = ("quality", "embedder", "retrieval", "retrieval_quality", "retrieval_scale", "rerank", "generation", "install", "compress_bench", "build_cache", "http_api")
