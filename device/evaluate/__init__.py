"""Evaluation of bundles on a QA set: retrieval quality per mode, answer quality, latency.

* :mod:`device.evaluate.metrics` — pure metric functions (recall@k, MRR, nDCG@k, percentiles, fact matching);
* :mod:`device.evaluate.qa` — the QA JSON Lines format and how a retrieved chunk is judged relevant;
* :mod:`device.evaluate.run` — :func:`evaluate` over one or more bundles -> :class:`EvalReport`;
* :mod:`device.evaluate.report` — JSON and self-contained HTML reports (plots need matplotlib, optional).

Device-side code: imports neither torch, transformers nor builder; matplotlib only when plotting.
"""

from fieldpack.device.evaluate.qa import QAItem, QASet, Target, load_qa
from fieldpack.device.evaluate.run import EvalOptions, EvalReport, evaluate

__all__ = ["EvalOptions", "EvalReport", "evaluate", "load_qa", "QAItem", "QASet", "Target"]
