"""metrics.jsonl and optional TensorBoard: the one place where records are written
(docs/architecture.md, "Run directory").

Only rank 0 writes. On resume the file is cut back to the checkpoint's step, so records that
a crashed run wrote after its last checkpoint do not appear twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmtrain import layout
from llmtrain.console import say
from llmtrain.engine.trackers import Trackers
from llmtrain.util.atomic import atomic_write
from llmtrain.util.owned import confined

TIMING_FIELDS = ("tokens_per_s", "elapsed_s", "mfu")  # the only fields that differ between reruns
# How to get the tensorboard package: the extra exists only for an install of this project.
TENSORBOARD_HINT = (
    "installed (pip install tensorboard; from a clone: pip install -e '.[tensorboard]')"
)


def truncate_after(path: Path, step: int) -> None:
    """Drop records (and events) with a step after `step`: they will be written again."""
    if not confined(path.parent, path).is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            if int(record.get("step", 0)) <= step:
                kept.append(line)
        except (ValueError, TypeError, AttributeError):
            continue  # a line torn by a crash, or not a record of ours
    atomic_write(path, "".join(f"{line}\n" for line in kept))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


class MetricsWriter:
    """Append-only metrics sink: jsonl always flushed per record, TensorBoard when asked, and
    the W&B / MLflow trackers (engine/trackers.py) when configured."""

    def __init__(
        self,
        path: Path,
        *,
        enabled: bool,
        jsonl: bool,
        tensorboard: bool,
        fresh: bool,
        trackers: Trackers | None = None,
    ):
        self.enabled = enabled
        self._file = None
        self._tb = None
        self._trackers = trackers if enabled else None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if jsonl:
            confined(path.parent, path)  # a link would send the records out of the run
            self._file = open(path, "w" if fresh else "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                tb_dir = confined(path.parent, path.parent / layout.TENSORBOARD_DIR)
                self._tb = SummaryWriter(str(tb_dir))
            except ImportError:
                say(
                    "log.tensorboard is on but the tensorboard package is not "
                    f"{TENSORBOARD_HINT}; only {layout.METRICS_FILE} is written",
                    label="warning",
                )

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._tb is not None and "split" in record:
            for key, value in record.items():
                if key not in ("split", "step") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{record['split']}/{key}", value, record["step"])
        if self._trackers is not None:
            self._trackers.write(record)

    def close(self, ok: bool = True) -> None:
        """`ok`: the run finished (trackers then attach report.png and the final eval)."""
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._trackers is not None:
            self._trackers.close(ok)
