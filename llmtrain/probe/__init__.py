"""The probe: measure the largest micro-batch that trains on this device
(docs/architecture.md, "Probing").

One job per module: `trial` (one measured trial on shadow copies), `search` (the search over
m and the probe that runs it), `memory` (capacity and peaks on CPU/CUDA), `cache`
(probe-cache.json), `plan` (config glue: what `fit` and `probe-batch` call), `result` (data).
"""

from llmtrain.probe.cache import CACHE_FILE
from llmtrain.probe.plan import probe_for_config, resolve_micro_batch, setup_from_config
from llmtrain.probe.result import MicroBatchPlan, ProbeResult, Trial
from llmtrain.probe.search import probe_micro_batch, search_micro_batch
from llmtrain.probe.trial import TrialSetup, run_trial

__all__ = [
    "CACHE_FILE",
    "MicroBatchPlan",
    "ProbeResult",
    "Trial",
    "TrialSetup",
    "probe_for_config",
    "probe_micro_batch",
    "resolve_micro_batch",
    "run_trial",
    "search_micro_batch",
    "setup_from_config",
]
