"""Parquet files and Arrow IPC files (the shards of a `datasets.save_to_disk` folder) as rows.

pyarrow reads them one record batch at a time and converts only the columns the corpus needs,
so memory stays at a batch whatever the file's size. Rows come out as plain dicts numbered
from 1, which the corpus reader checks exactly as it checks a JSON Lines record. pyarrow is
an optional dependency, imported when a columnar file is first opened.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from llmtrain.errors import LLMTrainError

# Rows per converted batch: enough that the per-batch overhead vanishes, few enough that a
# batch of long documents stays a few MB.
BATCH_ROWS = 1024
_READ_BUFFER = 1 << 20
# The first bytes of an Arrow IPC *file* (random access, "Feather v2"); anything else with
# an .arrow name is read as an IPC *stream*, the format datasets.save_to_disk writes.
_FILE_MAGIC = b"ARROW1"
# What datasets.save_to_disk writes beside its shards (none of it a corpus of its own); a
# folder holding both of the first two is a saved Dataset.
DATASET_STATE = "state.json"
DATASET_INFO = "dataset_info.json"
DATASET_DICT = "dataset_dict.json"

Progress = Callable[[float], None]  # called after each batch with the fraction of the file read


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError as e:
        raise LLMTrainError(
            "reading .parquet/.arrow corpora needs pyarrow: pip install 'llmtrain[parquet]'"
        ) from e
    return pyarrow


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


class ColumnarFile:
    """One open .parquet or .arrow file: its column names, then its rows batch by batch."""

    def __init__(self, path: Path, fmt: str, name: str):
        self.path, self.fmt, self.name = path, fmt, name
        self.pa = _pyarrow()
        try:
            self._open()
        except (OSError, self.pa.ArrowException) as e:
            raise LLMTrainError(f"{name}: cannot read as {fmt} ({_one_line(e)})") from e

    def _open(self) -> None:
        pa = self.pa
        self.parquet = self.stream = self.ipc_file = None
        if self.fmt == "parquet":
            # Buffered page reads: without them a whole row group's column chunk (hundreds of
            # MB in some files) is read into memory before the first row comes out.
            self.parquet = pa.parquet.ParquetFile(
                self.path, buffer_size=_READ_BUFFER, pre_buffer=False
            )
            self.schema = self.parquet.schema_arrow
            self.num_rows = self.parquet.metadata.num_rows
            return
        with open(self.path, "rb") as f:
            random_access = f.read(len(_FILE_MAGIC)) == _FILE_MAGIC
        self.source = pa.OSFile(str(self.path))  # read, not mapped: RSS stays at a batch
        if random_access:
            self.ipc_file = pa.ipc.open_file(self.source)
        else:
            self.stream = pa.ipc.open_stream(self.source)
        self.schema = (self.ipc_file or self.stream).schema
        self.num_rows = None

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names)

    def _batches(self, columns: list[str]) -> Iterator[Any]:
        if self.parquet is not None:
            yield from self.parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns)
        elif self.ipc_file is not None:
            for i in range(self.ipc_file.num_record_batches):
                yield self.ipc_file.get_batch(i).select(columns)
        else:
            for batch in self.stream:
                yield batch.select(columns)

    def rows(
        self, columns: list[str], progress: Progress, *, replace: bool = False
    ) -> Iterator[tuple[int, dict | None]]:
        """(row number from 1, {column: value}) over the file, only `columns` converted; the
        record is None for a row holding invalid UTF-8 (`replace`: substituted instead)."""
        n = 0
        try:
            for batch in self._batches(columns):
                for start in range(0, batch.num_rows, BATCH_ROWS):  # IPC batches can be large
                    part = batch.slice(start, BATCH_ROWS)
                    try:
                        records = part.to_pylist()
                    except UnicodeDecodeError:  # rare: find the row, one at a time
                        records = [self._row(part.slice(i, 1), replace) for i in range(len(part))]
                    for rec in records:
                        n += 1
                        yield n, rec
                progress(self._fraction(n))
        except (OSError, self.pa.ArrowException) as e:
            raise LLMTrainError(f"{self.name}: cannot read row {n + 1} ({_one_line(e)})") from e
        finally:
            if self.parquet is not None:
                self.parquet.close()
            else:
                self.source.close()

    def _row(self, row: Any, replace: bool) -> dict | None:
        """One row as a dict; None when it holds invalid UTF-8, unless `replace` substitutes
        U+FFFD in its top-level string columns (nested ones stay an error)."""
        try:
            return row.to_pylist()[0]
        except UnicodeDecodeError:
            if not replace:
                return None
        types, out = self.pa.types, {}
        for name, col in zip(row.schema.names, row.columns, strict=True):
            try:
                out[name] = col.to_pylist()[0]
            except UnicodeDecodeError:
                if not (types.is_string(col.type) or types.is_large_string(col.type)):
                    return None
                raw = col.cast(self.pa.large_binary()).to_pylist()[0]
                out[name] = raw.decode("utf-8", "replace")
        return out

    def _fraction(self, rows_done: int) -> float:
        if self.num_rows:
            return rows_done / self.num_rows
        if self.parquet is None and self.ipc_file is None:
            return self.source.tell() / max(1, self.path.stat().st_size)
        return 0.0


def dataset_files(folder: Path) -> list[Path] | None:
    """The Arrow shards of a `datasets.save_to_disk` folder in dataset order (its state.json
    lists them), or None when `folder` is not one."""
    state = folder / DATASET_STATE
    if not (state.is_file() and (folder / DATASET_INFO).is_file()):
        return None
    try:
        entries = json.loads(state.read_text(encoding="utf-8"))["_data_files"]
        return [folder / e["filename"] for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LLMTrainError(
            f"{state}: not a datasets state.json with _data_files ({_one_line(e)})"
        ) from e


def dataset_dict_splits(folder: Path) -> list[str] | None:
    """The split names of a `DatasetDict.save_to_disk` folder, or None when it is not one."""
    path = folder / DATASET_DICT
    if not path.is_file():
        return None
    try:
        return [str(s) for s in json.loads(path.read_text(encoding="utf-8"))["splits"]]
    except (OSError, ValueError, KeyError, TypeError):
        return sorted(p.name for p in folder.iterdir() if (p / DATASET_STATE).is_file())


__all__ = [
    "DATASET_STATE",
    "ColumnarFile",
    "dataset_dict_splits",
    "dataset_files",
]
