"""Metric sinks: where the trainer's records go.

A sink is any object with ``log(record: dict)`` and ``close()``. :class:`JsonlSink` writes one JSON object per
line and flushes it (a crashed run keeps every record written so far); :class:`WandbSink` sends records to
Weights & Biases (imported lazily; offline when no credentials are configured); :class:`MetricLogger` fans a
record out to several sinks.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

__all__ = ["Sink", "JsonlSink", "WandbSink", "MetricLogger"]


class Sink(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    try:  # tensors of one element, numpy scalars
        return _jsonable(v.item())
    except Exception:
        return str(v)


class JsonlSink:
    """Append records to a JSON-lines file, one object per line, flushed after each (NaN becomes null)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(_jsonable(record), allow_nan=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WandbSink:
    """Log records to Weights & Biases.

    Lists (e.g. the atom-usage vector) are logged as histograms. With offline_if_no_credentials=True (default)
    the run is offline unless WANDB_API_KEY is set (pass mode="online" to override), so a machine without
    network access still records the run locally.
    """

    def __init__(
        self,
        project: str,
        config: dict[str, Any] | None = None,
        *,
        offline_if_no_credentials: bool = True,
        **init_kwargs: Any,
    ):
        try:
            import wandb
        except ImportError:
            raise ImportError("WandbSink needs Weights & Biases: pip install globe-moe[wandb]") from None
        self._wandb = wandb
        mode = init_kwargs.pop("mode", None)
        if mode is None and offline_if_no_credentials and not _has_wandb_credentials():
            mode = "offline"
        self.run = wandb.init(project=project, config=_jsonable(config or {}), mode=mode, **init_kwargs)

    def log(self, record: dict[str, Any]) -> None:
        data: dict[str, Any] = {}
        for k, v in record.items():
            if isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) for x in v):
                data[k] = self._wandb.Histogram(list(v))
            elif isinstance(v, (int, float, bool)):
                data[k] = v
            elif isinstance(v, str):
                data[k] = v
        self.run.log(data)

    def close(self) -> None:
        self.run.finish()


def _has_wandb_credentials() -> bool:
    """An API key in the environment (WANDB_API_KEY); otherwise the run is offline unless a mode is given."""
    return bool(os.environ.get("WANDB_API_KEY"))


class MetricLogger:
    """Fan a record out to every sink; `context` entries are added to each record."""

    def __init__(self, sinks: Iterable[Sink] = (), **context: Any):
        self.sinks = list(sinks)
        self.context = dict(context)

    def log(self, record: dict[str, Any]) -> None:
        full = {**self.context, **record}
        for sink in self.sinks:
            sink.log(full)

    def child(self, **context: Any) -> MetricLogger:
        """A logger with the same sinks and extra context."""
        out = MetricLogger(self.sinks, **{**self.context, **context})
        return out

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
