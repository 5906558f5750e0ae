"""The cost models a run trains as its measurements arrive: one for latency, one for energy.

Either can be swapped (``Models(energy=...)``): anything with ``fit(features, y, latency_s=...)``,
``predict(features, latency_s=...) -> (mean, std)`` and ``trained`` will do, e.g. a constant-power
baseline in place of the XGBoost energy model.
"""
from __future__ import annotations

from typing import Sequence

# Fewest measurements a model is trained on: fewer say nothing about a space of thousands.
MIN_LATENCY_SAMPLES = 4
MIN_ENERGY_SAMPLES = 3


class Models:
    def __init__(self, latency=None, energy=None, seed: int = 0):
        from etune.energy_model.model import CostModel

        self.latency = latency if latency is not None else CostModel(target="latency", seed=seed)
        self.energy = energy if energy is not None else CostModel(target="energy", seed=seed)

    def retrain(self, trials: Sequence) -> None:
        """Fit both models on the trials measured so far (``Trial``: features, latency_s, energy_j)."""
        timed = [t for t in trials if t.latency_s is not None and t.features]
        if len(timed) >= MIN_LATENCY_SAMPLES:
            self.latency.fit([t.features for t in timed], [t.latency_s for t in timed])
        metered = [t for t in timed if t.energy_j is not None]
        if len(metered) >= MIN_ENERGY_SAMPLES:
            self.energy.fit([t.features for t in metered], [t.energy_j for t in metered],
                            latency_s=[t.latency_s for t in metered])

    def predict_latency(self, features: list[dict]) -> list[float] | None:
        """Predicted seconds per call, or None before the model is trained."""
        if not self.latency.trained:
            return None
        mean, _ = self.latency.predict(features)
        return [float(x) for x in mean]

    def predict_energy(self, features: list[dict], latency_s: list[float] | None):
        """(mean, std) of the predicted joules per call, or (None, None) before the model is trained."""
        if not self.energy.trained:
            return None, None
        mean, std = self.energy.predict(features, latency_s=latency_s)
        return [float(x) for x in mean], [float(x) for x in std]
