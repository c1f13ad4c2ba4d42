"""Prometheus counters and histograms kept as plain numbers, made into metric families only when
``/metrics`` is scraped.

``prometheus_client``'s own Counter and Histogram are built for threads: every ``inc`` and
``observe`` takes a lock, and a histogram's observation walks its buckets, one locked value each.
A request ends with seven such updates, all in the one Trio thread; here each is a dictionary
update. The families :meth:`CounterTally.family` and :meth:`HistogramTally.family` build have the
samples the client library's own metrics have (``_total`` and ``_created``; ``_bucket``,
``_count``, ``_sum`` and ``_created``), so the exposition reads the same.

Pure and synchronous: the wall clock (for ``_created``) is a parameter.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import Metric
from prometheus_client.utils import floatToGoString

Labels = tuple[str, ...]


class CounterTally:
    """A counter family: a total per label values, from the first ``inc`` of those values."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], *, clock: Callable[[], float] = time.time) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._clock = clock
        self.totals: dict[Labels, float] = {}
        self._created: dict[Labels, float] = {}

    def inc(self, labels: Labels, amount: float = 1.0) -> None:
        totals = self.totals
        if labels in totals:
            totals[labels] += amount
        else:
            totals[labels] = amount
            self._created[labels] = self._clock()

    def family(self) -> Metric:
        metric = Metric(self.name, self.documentation, "counter")
        for labels, total in self.totals.items():
            named = dict(zip(self.labelnames, labels))
            metric.add_sample(f"{self.name}_total", named, total)
            metric.add_sample(f"{self.name}_created", named, self._created[labels])
        return metric


@dataclass
class _Series:
    counts: list[int]  # per bucket, not cumulative (the last bucket is +Inf)
    created: float
    sum: float = 0.0


@dataclass
class HistogramTally:
    """A histogram family. ``bounds`` ascend and end with ``math.inf``; a value falls in the
    first bucket whose bound is at least the value, as Prometheus's ``le`` says. A histogram
    without labels has its one series from the start, as the client library's has."""

    name: str
    documentation: str
    labelnames: Sequence[str]
    bounds: Sequence[float]
    clock: Callable[[], float] = time.time
    series: dict[Labels, _Series] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.labelnames:
            self._new(())

    def observe(self, labels: Labels, value: float) -> None:
        series = self.series.get(labels) or self._new(labels)
        series.counts[bisect_left(self.bounds, value)] += 1
        series.sum += value

    def _new(self, labels: Labels) -> _Series:
        series = self.series[labels] = _Series([0] * len(self.bounds), self.clock())
        return series

    def family(self) -> Metric:
        metric = Metric(self.name, self.documentation, "histogram")
        bounds = [floatToGoString(bound) for bound in self.bounds]
        for labels, series in self.series.items():
            named = dict(zip(self.labelnames, labels))
            cumulative = 0
            for bound, count in zip(bounds, series.counts):
                cumulative += count
                metric.add_sample(f"{self.name}_bucket", {**named, "le": bound}, cumulative)
            metric.add_sample(f"{self.name}_count", named, cumulative)
            metric.add_sample(f"{self.name}_sum", named, series.sum)
            metric.add_sample(f"{self.name}_created", named, series.created)
        return metric
