"""Every name under a run's `output_dir`, defined once (docs/architecture.md, "Run
directory"). Everything that reads or writes a run directory takes its names from here.

A leaf module (it imports nothing of llmtrain), so that every layer may use it: engine/
writes checkpoints/, final/ and metrics.jsonl, rundir/ reads them, data/ caches its stores
and tokenizer here.
"""

from __future__ import annotations

CONFIG_FILE = "config.resolved.yaml"  # the config exactly as the run used it
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step-"  # checkpoints/step-00000100
FINAL_DIR = "final"
ADAPTER_DIR = "adapter"
LOCK_FILE = "llmtrain.lock"
STORE_DIR = "store"  # the token stores, one folder per split (data.store overrides it)
TRAIN_SPLIT = "train"  # store/train: the store of a single data.train source
TOKENIZER_DIR = "tokenizer"  # a tokenizer trained for the run (tokenizer.train)
PROBE_CACHE_FILE = "probe-cache.json"
PROBE_SNAPSHOT_FILE = "probe-snapshot.safetensors"  # the CPU probe's snapshot, while it runs
REPORT_FILE = "report.png"
WANDB_DIR = "wandb"  # log.wandb's local files (offline runs: not yet synced)
TRACKERS_FILE = "trackers.json"  # the W&B / MLflow run ids a resume continues
DATA_RECORD_FILE = "data.resolved.json"  # the fingerprints of the data the run trains on
# The note rank 0 leaves for the other ranks of a job to find (rundir/shared_fs.py), for a
# moment, as `.tmp-shared-fs-<token>-<pid>`: named as a temporary so that one a killed job
# left behind is swept like any other (util/atomic.remove_stale_temps).
SHARED_FS_NOTE = "shared-fs"
# What marks a directory as llmtrain's own (a run, a store, a split's store, `final/`): it
# deletes or replaces only what carries it (util/owned.py). A checkpoint's mark is COMPLETE.
OWNER_MARK = ".llmtrain"
COMPLETE_FILE = "complete"  # written last into a checkpoint: without it, not a checkpoint

# What `fit --overwrite` removes; the token stores, the trained tokenizer and
# probe-cache.json are caches keyed by what they depend on, and stay.
RUN_OUTPUTS = (
    CHECKPOINTS_DIR,
    FINAL_DIR,
    ADAPTER_DIR,
    METRICS_FILE,
    CONFIG_FILE,
    DATA_RECORD_FILE,
    TENSORBOARD_DIR,
    WANDB_DIR,
    TRACKERS_FILE,
)
# Every name llmtrain gives a file of its own in a run directory: no command writes its output
# over one of them (rundir/outputs.py).
RUN_FILES = (*RUN_OUTPUTS, LOCK_FILE, STORE_DIR, TOKENIZER_DIR, PROBE_CACHE_FILE, OWNER_MARK)


def checkpoint_name(step: int) -> str:
    """`step-00000100` for step 100."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def train_source_store(name: str) -> str:
    """`train-web`: the store folder of the mixture source named `web` (under STORE_DIR)."""
    return f"{TRAIN_SPLIT}-{name}"
