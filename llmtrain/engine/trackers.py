"""Weights & Biases and MLflow, as sinks of the metrics writer (docs/architecture.md,
"Trackers"), each through its own library.

A tracker receives exactly the train and eval records that go to metrics.jsonl, as metrics
`<split>/<key>` (train/loss, eval/ppl, eval/web/loss) against the optimizer step; the resolved
config, flattened to dotted keys, as parameters; and, when the run finishes, report.png (drawn
by `llmtrain.plot` from metrics.jsonl) and the final eval records. Only rank 0 opens trackers:
`MetricsWriter` is disabled on the other ranks.

Resume. `<output_dir>/trackers.json` (written atomically) keeps each tracker's run id and the
last step (and the splits at that step) it was sent; a resumed run continues the same tracker
runs. What it sends again depends on the tracker:

- MLflow writes each batch before `log_batch` returns, and its metric history keeps
  duplicates: a record at or before the last step sent is not sent again. metrics.jsonl drops
  what a killed run wrote after its checkpoint and writes it again; a resumed run remakes those
  records exactly (timing fields aside), so MLflow keeps the first copy. A record sent just
  before a kill, before trackers.json noted it, can be sent twice (at most one).
- W&B buffers (its `.wandb` file is flushed every 15 s; a killed process loses the rest), and
  keeps one history row per step, ignoring a step below the run's current one. So a resumed W&B
  run is sent metrics.jsonl again (as cut back to the checkpoint), then every new record: what
  W&B already holds is ignored, what the kill lost is filled in.

A tracker never costs the run: its package missing, its service unreachable, or a call that
raises mid-run is one warning line, and the run goes on with metrics.jsonl (that tracker off).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtrain import layout
from llmtrain.config import Config
from llmtrain.config.schema import MlflowConfig, WandbConfig
from llmtrain.console import say
from llmtrain.plot import RunMetrics, draw, is_eval
from llmtrain.util.atomic import atomic_write

STATE_FILE = layout.TRACKERS_FILE
MLFLOW_PARAM_BATCH = 100  # MLflow's most params per log_batch call
MLFLOW_PARAM_MAX = 6000  # MLflow's longest param value


def warn(message: str) -> None:
    say(message, label="warning")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}: the resolved config as parameters."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def metrics_of(record: dict[str, Any]) -> dict[str, float]:
    """A train or eval record's numbers as `<split>/<key>` metrics."""
    split = record["split"]
    return {
        f"{split}/{k}": float(v)
        for k, v in record.items()
        if k not in ("split", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def parse(line: str) -> dict[str, Any] | None:
    """A train or eval record of metrics.jsonl; None for an event or a torn line."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    ok = isinstance(record, dict) and isinstance(record.get("split"), str)
    return record if ok and isinstance(record.get("step"), int) else None


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


class Tracker(ABC):
    """One tracking service: start (or resume) its run, log metrics, attach, finish."""

    name: str  # its key under log: (and in trackers.json)
    package: str  # the pip package, also the llmtrain extra
    replays = False  # on resume: send metrics.jsonl again (True) or skip what was sent (False)

    @abstractmethod
    def start(self, params: dict[str, Any], run_id: str | None) -> str:
        """Start a run, or continue `run_id`; returns the run's id."""

    @abstractmethod
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    @abstractmethod
    def attach(self, report_png: bytes | None, final: dict[str, Any]) -> None:
        """report.png (None when it could not be drawn) and the final eval records."""

    @abstractmethod
    def finish(self, ok: bool) -> None: ...


class WandbTracker(Tracker):
    name, package = "wandb", "wandb"
    replays = True  # buffered (a kill loses the tail); one row per step, lower steps ignored

    def __init__(self, cfg: WandbConfig, run_name: str, out: Path):
        self.cfg, self.run_name, self.out = cfg, run_name, out
        self.run: Any = None

    def start(self, params: dict[str, Any], run_id: str | None) -> str:
        import wandb

        # wandb's own output (banners, sync hints, system stats) stays off the terminal; its
        # logs are in <output_dir>/wandb/
        settings = wandb.Settings(
            silent=True,
            quiet=True,
            console="off",
            show_info=False,
            show_warnings=False,
            x_disable_stats=True,
            disable_git=True,
            save_code=False,
            x_save_requirements=False,
        )
        c = self.cfg
        self.run = wandb.init(
            project=c.project or self.run_name,
            entity=c.entity,
            name=c.name or self.run_name,
            tags=c.tags or None,
            mode=c.mode,
            dir=str(self.out),
            id=run_id,
            resume="allow" if run_id else None,
            config=params,
            allow_val_change=True,  # a resume may change safe keys (max_steps, cadence)
            reinit="create_new",  # the caller's own W&B run, if any, is left alone
            settings=settings,
        )
        return str(self.run.id)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def attach(self, report_png: bytes | None, final: dict[str, Any]) -> None:
        files = Path(self.run.dir)
        atomic_write(files / "final_eval.json", json.dumps(final, indent=1))
        self.run.save(str(files / "final_eval.json"), base_path=str(files), policy="now")
        if report_png is not None:
            atomic_write(files / "report.png", report_png)
            self.run.save(str(files / "report.png"), base_path=str(files), policy="now")
        self.run.summary.update(
            {f"final/{k}": v for r in final.values() for k, v in metrics_of(r).items()}
        )

    def finish(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class MlflowTracker(Tracker):
    name, package = "mlflow", "mlflow"

    def __init__(self, cfg: MlflowConfig, run_name: str):
        self.cfg, self.run_name = cfg, run_name
        self.client: Any = None
        self.run_id = ""

    def start(self, params: dict[str, Any], run_id: str | None) -> str:
        # MLflow retries an unreachable server 7 times with backoff (minutes of a stalled
        # run); a few seconds tell. The user's own settings win.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        uri = self.cfg.tracking_uri
        if uri is not None and (uri.startswith("file:") or "://" not in uri):
            # MLflow 3 refuses a file store unless asked; a file: URI in the config is asking
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return run_id
        name = self.cfg.experiment or self.run_name
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else self.client.create_experiment(name)
        run = self.client.create_run(experiment, run_name=self.cfg.run_name or self.run_name)
        self.run_id = run.info.run_id
        self.log_params(params)  # once: MLflow params cannot change, a resume keeps the first
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [
            Param(
                re.sub(r"[^\w\-. /]", "_", k),
                (v if isinstance(v, str) else json.dumps(v))[:MLFLOW_PARAM_MAX],
            )
            for k, v in params.items()
        ]
        for i in range(0, len(items), MLFLOW_PARAM_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + MLFLOW_PARAM_BATCH])

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items() if math.isfinite(v)]
        self.client.log_batch(self.run_id, metrics=batch)

    def attach(self, report_png: bytes | None, final: dict[str, Any]) -> None:
        self.client.log_dict(self.run_id, final, "final_eval.json")
        if report_png is not None:
            with tempfile.TemporaryDirectory(prefix="llmtrain-mlflow-") as tmp:
                path = Path(tmp) / "report.png"
                path.write_bytes(report_png)
                self.client.log_artifact(self.run_id, str(path))

    def finish(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


@dataclass
class Sent:
    """The last step a tracker was sent and the splits sent at it: records are sent in step
    order, so this says whether a record was already sent."""

    step: int = -1
    splits: list[str] = field(default_factory=list)

    def covers(self, step: int, split: str) -> bool:
        return step < self.step or (step == self.step and split in self.splits)

    def add(self, step: int, split: str) -> None:
        if step != self.step:
            self.step, self.splits = step, []
        self.splits.append(split)


def configured(cfg: Config, out: Path) -> list[Tracker]:
    """The trackers `log:` asks for."""
    found: list[Tracker] = []
    if cfg.log.wandb is not None:
        found.append(WandbTracker(cfg.log.wandb, cfg.run.name, out))
    if cfg.log.mlflow is not None:
        found.append(MlflowTracker(cfg.log.mlflow, cfg.run.name))
    return found


def read_state(out: Path) -> dict[str, Any]:
    """trackers.json: {tracker: {"id", "step", "splits"}}; {} when absent or unreadable."""
    try:
        state = json.loads((out / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


class Trackers:
    """The configured trackers as one sink: `write` each record, `close` at the end."""

    def __init__(self, cfg: Config, out: Path, live: list[Tracker], state: dict[str, Any]):
        self.cfg, self.out, self.live = cfg, out, live
        self.ids = {t.name: state[t.name]["id"] for t in live}
        self.sent = {
            t.name: Sent(int(state[t.name].get("step", -1)), list(state[t.name].get("splits", [])))
            for t in live
        }
        self.final: dict[str, dict[str, Any]] = {}  # the last eval record of each split
        # a tracker that could not start this time keeps its run for the next resume
        self.kept = {n: v for n, v in state.items() if n not in self.ids}

    @classmethod
    def open(cls, cfg: Config, out: Path, *, fresh: bool) -> Trackers | None:
        """Start every configured tracker, or continue its run when resuming (`fresh` False
        and trackers.json names it); None when none is configured. A tracker that cannot
        start is one warning, and is left out."""
        wanted = configured(cfg, out)
        if not wanted:
            return None
        saved = {} if fresh else read_state(out)
        params = flatten(cfg.model_dump(mode="json"))
        live: list[Tracker] = []
        state = {n: v for n, v in saved.items() if isinstance(v, dict) and "id" in v}
        for tracker in wanted:
            before = saved.get(tracker.name) or {}
            try:
                run_id = tracker.start(params, before.get("id"))
            except ImportError:
                warn(
                    f"log.{tracker.name} is set but the {tracker.package} package is not "
                    f"installed (pip install 'llmtrain[{tracker.package}]'); logging to "
                    "metrics.jsonl only"
                )
                continue
            except Exception as e:  # any failure of a service is the tracker's, not the run's
                warn(f"log.{tracker.name}: could not start ({one_line(e)}); training goes on")
                continue
            same = before.get("id") == run_id
            state[tracker.name] = {**(before if same else {}), "id": run_id}
            live.append(tracker)
        sink = cls(cfg, out, live, state)
        if not fresh:  # and a tracker first configured on this resume gets the run so far
            sink.replay([t for t in live if t.replays or not (saved.get(t.name) or {}).get("id")])
        sink.save()
        return sink

    def replay(self, trackers: list[Tracker]) -> None:
        """Send metrics.jsonl (already cut back to the checkpoint) to `trackers` again."""
        path = self.out / layout.METRICS_FILE
        if not trackers or not path.is_file():
            return
        records = [r for r in map(parse, path.read_text(encoding="utf-8").splitlines()) if r]
        for tracker in trackers:
            try:
                for record in records:
                    tracker.log(metrics_of(record), int(record["step"]))
            except Exception as e:
                self.drop(tracker, e)

    def save(self) -> None:
        state = {
            n: {"id": self.ids[n], "step": s.step, "splits": s.splits} for n, s in self.sent.items()
        }
        state.update(self.kept)
        atomic_write(self.out / STATE_FILE, json.dumps(state, indent=1) + "\n")

    def write(self, record: dict[str, Any]) -> None:
        """Send a train or eval record (events are not metrics) to every live tracker that
        was not sent it yet."""
        split, step = record.get("split"), record.get("step")
        if not isinstance(split, str) or not isinstance(step, int):
            return
        if is_eval(record):
            self.final[split] = record
        metrics, changed = metrics_of(record), False
        for tracker in list(self.live):
            sent = self.sent[tracker.name]
            if sent.covers(step, split) and not tracker.replays:
                continue
            try:
                tracker.log(metrics, step)
            except Exception as e:
                self.drop(tracker, e)
                continue
            sent.add(step, split)
            changed = True
        if changed:
            self.save()

    def drop(self, tracker: Tracker, exc: BaseException) -> None:
        """A tracker that failed is off for the rest of the run; the run goes on."""
        self.live.remove(tracker)
        warn(
            f"log.{tracker.name} failed ({one_line(exc)}); it is off for the rest of this run, "
            "metrics.jsonl has every record"
        )
        with contextlib.suppress(Exception):  # it already failed once; the warning said so
            tracker.finish(False)

    def close(self, ok: bool) -> None:
        """A finished run attaches report.png and the final eval records; every tracker's
        run is then ended (failed when the run did not finish: a resume continues it)."""
        png = self.report_png() if ok and self.live else None
        for tracker in list(self.live):
            try:
                if ok:
                    tracker.attach(png, self.final)
                tracker.finish(ok)
            except Exception as e:
                self.drop(tracker, e)

    def report_png(self) -> bytes | None:
        """`llmtrain report`'s picture of this run's metrics.jsonl (None without one)."""
        path = self.out / layout.METRICS_FILE
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return None
        records = [r for r in map(parse, lines) if r]
        return draw([RunMetrics.of(self.cfg.run.name, self.out, records)])
