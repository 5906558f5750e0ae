"""Model-free stand-ins for the energy model, to show what the model adds (issue 14).

``ConstantPowerModel`` predicts every candidate's energy as one power (the median measured average
power of its training candidates) times the candidate's latency. It has the interface the tuner uses
of ``CostModel(target="energy")`` (``fit``, ``predict``, ``trained``), so it can replace the model in
the tuning loop, the benchmarks and the accuracy test. The selection baselines (random choice, the k
fastest) are policies: ``policy.RandomPolicy`` and ``policy.FastestFirstPolicy``.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from .model import ModelError


class ConstantPowerModel:
    """Energy = median training power x latency; the spread of bootstrap medians as uncertainty."""

    target = "energy"
    mode = "power"

    def __init__(self, bootstrap: int = 200, seed: int = 0):
        self.bootstrap = bootstrap
        self.seed = seed
        self.power_w: float | None = None
        self.relative_std = 0.0  # std of the bootstrap medians over the median

    @property
    def trained(self) -> bool:
        return self.power_w is not None

    def __repr__(self) -> str:
        return f"ConstantPowerModel({self.power_w:.1f} W)" if self.trained else "ConstantPowerModel(untrained)"

    def fit(self, features: Sequence[Mapping[str, float]], y: Sequence[float],
            latency_s: Sequence[float] | None = None, **ignored) -> "ConstantPowerModel":
        """Measured energies ``y`` (J) and latencies (s); features are ignored. Other keyword arguments
        of ``CostModel.fit`` (warm_start, sample_weight) are accepted and ignored: every fit uses all
        the data it is given."""
        if latency_s is None:
            raise ValueError("ConstantPowerModel needs the measured latency of every training sample")
        energy = np.asarray(y, dtype=np.float64)
        latency = np.asarray([np.nan if v is None else v for v in latency_s], dtype=np.float64)
        if energy.shape != latency.shape or len(features) != energy.shape[0]:
            raise ValueError("features, y and latency_s differ in length")
        valid = np.isfinite(energy) & (energy > 0) & np.isfinite(latency) & (latency > 0)
        if not valid.any():
            raise ModelError("need at least 1 valid sample to train")
        power = energy[valid] / latency[valid]
        self.power_w = float(np.median(power))
        rng = np.random.default_rng(self.seed)
        medians = np.median(rng.choice(power, size=(self.bootstrap, power.size)), axis=1)
        self.relative_std = float(medians.std() / self.power_w)
        return self

    def predict(self, features: Sequence[Mapping[str, float]], latency_s=None) -> tuple[np.ndarray, np.ndarray]:
        """(energy, std) per row: the constant power times the row's latency (required)."""
        if not self.trained:
            raise ModelError("the model is not trained")
        n = len(features)
        if latency_s is None:
            raise ModelError("ConstantPowerModel needs latency_s for every row (it has no latency model)")
        latency = np.asarray([np.nan if v is None else v for v in latency_s], dtype=np.float64)
        if latency.shape != (n,):
            raise ValueError(f"expected {n} latencies, got {latency.shape[0]}")
        if not (np.isfinite(latency) & (latency > 0)).all():
            raise ModelError("ConstantPowerModel needs a positive latency for every row")
        mean = self.power_w * latency
        return mean, self.relative_std * mean


__all__ = ["ConstantPowerModel"]
