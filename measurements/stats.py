"""The one definition of a measurement's ``spread``, shared by every backend."""
from __future__ import annotations

import statistics
from typing import Iterable


def coefficient_of_variation(values: Iterable[float]) -> float | None:
    """Sample standard deviation over mean (``spread`` in every record); None with fewer than two
    values or a mean that is not positive."""
    values = list(values)
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    return statistics.stdev(values) / mean if mean > 0 else None
