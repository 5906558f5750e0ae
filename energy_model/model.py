"""XGBoost energy and latency models: weighted loss, ensemble uncertainty, save/load and transfer.

The method of arXiv 2411.18873 predicts a kernel's energy from high-level features with gradient
boosted trees trained with a weighted loss that favours the efficient schedules (the ones a search
cares about). Here:

* **Targets in log space.** Relative errors become additive, which is what MAPE and ranking need.
  Energy (mode "energy") and latency are divided by the workload's roofline time first (a constant
  within one workload); ``baseline="bottleneck"`` divides by the candidate's own analytic time
  estimate instead (``bottleneck_time_s``), which lets trees extrapolate to schedules unlike any
  trained on, at some cost in top-k recall on sim (see the benchmark); the default is "workload".
* **Two ways to predict energy.** ``mode="energy"`` regresses energy directly from the features.
  ``mode="power"`` regresses the average power ``energy / latency`` and predicts
  ``energy = power x latency``; the latency is the measured one (every built candidate has its
  latency measured before energy is considered), else the prediction of a latency model trained
  alongside. In power mode the latency is also an input: the achieved rates (work / latency,
  ``features.rate_features``), because average power is idle power plus energy per operation times
  operations per second. Power varies far less across schedules than energy (it is bounded by idle
  power and the cap), so it is the easier target: on sim it roughly halves the energy MAPE of the
  direct model (benchmarks/energy_model_accuracy.py) and is ``DEFAULT_ENERGY_MODE``.
* **Relative features** (``relative=True``): amounts that grow with the problem are given per unit
  of the workload (``features.relative_features``), so a model moved to another shape stays inside
  the feature range it was trained on. Within one workload this changes nothing.
* **Weighted loss.** A sample's weight is ``floor + (1 - floor) * (min(y) / y) ** power``: the
  normalised efficiency (as MetaSchedule / Ansor weight by normalised throughput), with a floor so
  the tail still counts; normalised to mean 1. The favoured quantity is energy for the energy model
  (both modes) and latency for the latency model. It helps where the model's capacity is short of the
  function's (tests/test_energy_model.py shows it on a synthetic function); on sim, with the default
  capacity, weighted and unweighted are within noise of each other.
* **Uncertainty.** ``ensemble`` members: member 0 (the anchor) is trained on all samples; the others
  on Bayesian-bootstrap reweightings (exponential weights, seeded), so every sample keeps some weight.
  ``predict`` returns the anchor's prediction as the mean (classic bootstrap members averaged were
  less accurate with 64 samples: they drop the few extreme, most informative points) and the spread
  of the members around it as the standard deviation, both in the target's units.
* **Persistence and transfer.** ``save(path)`` writes one JSON file: settings, feature names, the
  training data (optional) and each member in XGBoost's own UBJSON model format (base64). No pickle.
  ``CostModel.load(path)`` gives a model that predicts identically. ``fit(..., warm_start=True)``
  (``update(how="boost")``) shifts the loaded model by its mean log error on the new data, then adds
  trees fitted to what remains; ``update(how="refit")`` retrains on the saved data plus the new.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .features import BUILD_FEATURES, FEATURE_NAMES, feature_names_of, rate_features, relative_features, to_matrix

TARGETS = ("energy", "latency")
ENERGY_MODES = ("energy", "power")
# Chosen on sim by benchmarks/energy_model_accuracy.py (power mode was the more accurate on every workload).
DEFAULT_ENERGY_MODE = "power"
FORMAT_VERSION = 1


class ModelError(RuntimeError):
    pass


@dataclasses.dataclass
class TrainingData:
    features: list[dict]
    y: list[float]
    latency_s: list[float] | None = None

    def to_json(self, names: Sequence[str]) -> dict:
        matrix = to_matrix(self.features, names)
        return {"names": list(names),
                "rows": [[None if math.isnan(v) else v for v in row] for row in matrix.tolist()],
                "y": list(map(float, self.y)),
                "latency_s": None if self.latency_s is None else [_none_if_nan(v) for v in self.latency_s]}

    @classmethod
    def from_json(cls, data: dict) -> "TrainingData":
        names = data["names"]
        features = [{n: (math.nan if v is None else float(v)) for n, v in zip(names, row)} for row in data["rows"]]
        latency = data.get("latency_s")
        return cls(features, list(data["y"]), None if latency is None else
                   [math.nan if v is None else float(v) for v in latency])


def _none_if_nan(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def efficiency_weights(y: Sequence[float], floor: float = 0.2, power: float = 1.0) -> np.ndarray:
    """``floor + (1 - floor) * (min(y) / y) ** power``, normalised to mean 1 (lower y is better)."""
    y = np.asarray(y, dtype=np.float64)
    if y.size == 0:
        return y
    efficiency = np.min(y) / y
    w = floor + (1.0 - floor) * efficiency**power
    return w / w.mean()


def _as_float_array(values, n: int) -> np.ndarray:
    if values is None:
        return np.full(n, np.nan)
    out = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    if out.shape != (n,):
        raise ValueError(f"expected {n} values, got {out.shape[0]}")
    return out


class CostModel:
    """Bootstrap ensemble of XGBoost regressors for one target (energy in joules or latency in s)."""

    def __init__(self, target: str = "energy", mode: str | None = None, ensemble: int = 5, seed: int = 0,
                 weighted: bool = True, weight_floor: float = 0.2, weight_power: float = 1.0,
                 n_estimators: int = 300, max_depth: int = 4, learning_rate: float = 0.05,
                 subsample: float = 0.8, colsample_bytree: float = 0.8, min_child_weight: float = 0.5,
                 reg_lambda: float = 1.0, warm_rounds: int | None = None, augment_missing_build: bool = True,
                 resample: str = "bayesian", anchor: bool = True, center: str = "anchor",
                 latency_features: bool | None = None, relative: bool = True, baseline: str = "workload",
                 n_jobs: int = 1):
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, not {target!r}")
        if target == "latency":
            if mode not in (None, "latency", "direct"):
                raise ValueError("mode applies to the energy target only")
            mode = "latency"
        else:
            mode = mode or DEFAULT_ENERGY_MODE
            if mode not in ENERGY_MODES:
                raise ValueError(f"mode must be one of {ENERGY_MODES}, not {mode!r}")
        if ensemble < 1:
            raise ValueError("ensemble must be >= 1")
        self.target = target
        self.mode = mode
        self.ensemble = ensemble
        self.seed = seed
        self.weighted = weighted
        self.weight_floor = weight_floor
        self.weight_power = weight_power
        self.params = dict(n_estimators=n_estimators, max_depth=max_depth, learning_rate=learning_rate,
                           subsample=subsample, colsample_bytree=colsample_bytree,
                           min_child_weight=min_child_weight, reg_lambda=reg_lambda)
        self.warm_rounds = warm_rounds if warm_rounds is not None else max(1, n_estimators // 2)
        self.augment_missing_build = augment_missing_build
        if resample not in ("bootstrap", "bayesian", "none"):
            raise ValueError("resample must be bootstrap, bayesian or none")
        self.resample = resample
        self.anchor = anchor
        self.center = center
        # Power mode: the achieved rates (work / latency) as inputs too; see features.rate_features.
        self.relative = relative  # features per unit of the workload (features.relative_features)
        if baseline not in ("workload", "bottleneck"):
            raise ValueError("baseline must be 'workload' or 'bottleneck'")
        self.baseline = baseline
        self.latency_baseline = "workload"  # of the latency model a power model trains alongside
        self.latency_features = (mode == "power") if latency_features is None else bool(latency_features)
        if self.latency_features and mode != "power":
            raise ValueError("latency_features needs mode='power' (the other modes predict without a latency)")
        self.n_jobs = n_jobs
        self.feature_names: list[str] | None = None
        self.members: list = []  # xgboost.Booster
        self.latency_model: CostModel | None = None  # power mode: latency when none is given
        self.data: TrainingData | None = None
        self.n_fits = 0
        self.offset = 0.0  # added to every member's log prediction (set by warm starts)

    # -- state ---------------------------------------------------------------------------------
    @property
    def trained(self) -> bool:
        return bool(self.members)

    def __repr__(self) -> str:
        state = f"{len(self.members)} members, {len(self.data.y) if self.data else 0} samples" if self.trained \
            else "untrained"
        return f"CostModel(target={self.target!r}, mode={self.mode!r}, {state})"

    # -- targets -------------------------------------------------------------------------------
    def _column(self, X: np.ndarray, name: str) -> np.ndarray:
        if name not in self.feature_names:
            return np.full(X.shape[0], np.nan)
        return X[:, self.feature_names.index(name)].copy()

    def _scale(self, X: np.ndarray) -> np.ndarray:
        """Per-row normaliser of the target: the workload's roofline time, or with
        ``baseline="bottleneck"`` the candidate's own analytic time estimate (1 where unknown)."""
        scale = self._column(X, "workload_roofline_s")
        if self.baseline == "bottleneck":
            estimate = self._column(X, "bottleneck_time_s")
            scale = estimate * scale if self.relative else estimate
        scale[~(np.isfinite(scale) & (scale > 0))] = 1.0
        return scale

    def _log_target(self, X, y, latency) -> np.ndarray:
        if self.mode == "power":
            return np.log(y / latency)
        return np.log(y / self._scale(X))

    # -- training ------------------------------------------------------------------------------
    def fit(self, features: Sequence[Mapping[str, float]], y: Sequence[float],
            latency_s: Sequence[float] | None = None, warm_start: bool = False,
            sample_weight: Sequence[float] | None = None) -> "CostModel":
        """Train on measured candidates. ``latency_s`` (measured) is required in power mode.

        ``warm_start=True`` on a trained (or loaded) model keeps its trees, shifts its output by the
        mean log error on these data (an offset: new shape, same schedules' relative costs), then adds
        ``warm_rounds`` more trees per member fitted to what remains; otherwise the members are
        trained from scratch.
        Non-finite or non-positive targets are dropped.
        """
        import xgboost as xgb

        y = np.asarray(y, dtype=np.float64)
        features = list(features)
        if len(features) != y.shape[0]:
            raise ValueError(f"{len(features)} feature rows for {y.shape[0]} targets")
        latency = _as_float_array(latency_s, len(features))
        if self.mode == "power" and latency_s is None:
            raise ValueError("mode='power' needs the measured latency of every training sample")
        keep = np.isfinite(y) & (y > 0)
        if self.mode == "power":
            keep &= np.isfinite(latency) & (latency > 0)
        extra_w = np.ones(len(features)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        idx = np.flatnonzero(keep)
        if idx.size < 2:
            raise ModelError(f"need at least 2 valid samples to train, got {idx.size}")
        features = [features[i] for i in idx]
        y, latency, extra_w = y[idx], latency[idx], extra_w[idx]
        raw_features = features

        features = self._prepare(features, latency)
        warm = warm_start and self.trained
        if not warm:
            self.feature_names = feature_names_of(features)
        X = to_matrix(features, self.feature_names)
        z = self._log_target(X, y, latency)
        w = efficiency_weights(y, self.weight_floor, self.weight_power) if self.weighted else np.ones_like(y)
        w = w * extra_w
        if warm:
            # New data (a new shape, another GPU) often differ from the old by a common factor: take
            # it out as an offset first, so the new trees learn the differences between schedules.
            residual = z - self._member_log_predictions(X)[0]
            self.offset += float(np.average(residual, weights=w))
        else:
            self.offset = 0.0
        z = z - self.offset
        X, z, w = self._augment(X, z, w)
        n = X.shape[0]
        members = []
        for m in range(self.ensemble):
            rng = np.random.default_rng([self.seed, m, self.n_fits])
            if m == 0 and self.anchor or self.ensemble == 1 or self.resample == "none":
                counts = np.ones(n)
            elif self.resample == "bayesian":
                counts = rng.exponential(1.0, n)  # Dirichlet weights (x n): every sample keeps some weight
            else:
                counts = rng.multinomial(n, np.full(n, 1.0 / n)).astype(np.float64)
            wm = w * counts
            if wm.sum() <= 0:
                wm = w
            params = dict(self.params)
            if warm:
                params["n_estimators"] = self.warm_rounds
            regressor = xgb.XGBRegressor(objective="reg:squarederror", tree_method="hist",
                                         random_state=self.seed * 1000 + m, n_jobs=self.n_jobs, **params)
            regressor.fit(X, z, sample_weight=wm, xgb_model=self.members[m] if warm else None)
            members.append(regressor.get_booster())
        self.members = members
        self.n_fits += 1

        if warm and self.data is not None and self.data.features:
            self.data = TrainingData(self.data.features + raw_features, self.data.y + list(map(float, y)),
                                     (self.data.latency_s or [math.nan] * len(self.data.y)) + list(latency))
        else:
            self.data = TrainingData(raw_features, list(map(float, y)), list(map(float, latency)))

        if self.mode == "power":
            # Latency model for predictions without a measured latency (unbuilt candidates).
            if self.latency_model is None or not warm:
                self.latency_model = CostModel("latency", ensemble=self.ensemble, seed=self.seed,
                                               weighted=self.weighted, weight_floor=self.weight_floor,
                                               weight_power=self.weight_power, warm_rounds=self.warm_rounds,
                                               augment_missing_build=self.augment_missing_build,
                                               resample=self.resample, anchor=self.anchor, center=self.center,
                                               relative=self.relative, baseline=self.latency_baseline,
                                               n_jobs=self.n_jobs, **self.params)
            self.latency_model.fit(raw_features, latency, warm_start=warm)
        return self

    def _prepare(self, features, latency) -> list[dict]:
        """Model inputs from candidate features: achieved rates when the latency is an input, and
        amounts per unit of the workload when ``relative``."""
        if self.latency_features:
            features = [{**f, **rate_features(f, lat)} for f, lat in zip(features, latency)]
        if self.relative:
            features = [relative_features(f) for f in features]
        return features

    def _augment(self, X, z, w):
        """Rows with build features again with those features missing, so a model trained on built
        candidates still predicts sensibly for unbuilt ones (XGBoost learns the missing direction)."""
        if not self.augment_missing_build:
            return X, z, w
        cols = [self.feature_names.index(n) for n in BUILD_FEATURES if n in self.feature_names]
        if not cols:
            return X, z, w
        has = ~np.all(np.isnan(X[:, cols]), axis=1)
        if not has.any():
            return X, z, w
        masked = X[has].copy()
        masked[:, cols] = np.nan
        return np.vstack([X, masked]), np.concatenate([z, z[has]]), np.concatenate([w, w[has]])

    def update(self, features, y, latency_s=None, how: str = "boost", prior_weight: float = 0.5) -> "CostModel":
        """New measurements for a trained or loaded model.

        ``how="boost"``: warm start (new trees on the new data). ``how="refit"``: retrain from scratch on
        the data the model was trained on (weighted ``prior_weight``) plus the new data (weight 1).
        """
        if how == "boost":
            return self.fit(features, y, latency_s, warm_start=True)
        if how != "refit":
            raise ValueError("how must be 'boost' or 'refit'")
        old = self.data or TrainingData([], [], [])
        old_latency = old.latency_s or [math.nan] * len(old.y)
        new_latency = list(latency_s) if latency_s is not None else [math.nan] * len(y)
        weights = [prior_weight] * len(old.y) + [1.0] * len(y)
        self.data = None
        return self.fit(list(old.features) + list(features), list(old.y) + list(y), old_latency + new_latency,
                        sample_weight=weights)

    # -- prediction ----------------------------------------------------------------------------
    def _member_log_predictions(self, X: np.ndarray) -> np.ndarray:
        """(members, rows) predictions of the log target."""
        import xgboost as xgb

        dm = xgb.DMatrix(X, missing=np.nan)
        return np.stack([b.predict(dm) for b in self.members]).astype(np.float64) + self.offset

    def predict_members(self, features: Sequence[Mapping[str, float]], latency_s=None) -> np.ndarray:
        """(members, rows) predictions in the target's units (joules or seconds)."""
        if not self.trained:
            raise ModelError("the model is not trained")
        features = list(features)
        if not features:
            return np.zeros((len(self.members), 0))
        if self.mode != "power":
            X = to_matrix(self._prepare(features, None), self.feature_names)
            return np.exp(self._member_log_predictions(X)) * self._scale(X)
        latency = _as_float_array(latency_s, len(features))
        missing = ~(np.isfinite(latency) & (latency > 0))
        L = np.broadcast_to(latency, (len(self.members), len(features))).copy()
        if missing.any():
            if self.latency_model is None or not self.latency_model.trained:
                raise ModelError("power mode needs latency_s for these rows (no latency model was trained)")
            rows = [features[i] for i in np.flatnonzero(missing)]
            lat_members = self.latency_model.predict_members(rows)
            lat_mean, _ = self.latency_model.predict(rows)
            if lat_members.shape[0] != L.shape[0]:
                lat_members = np.broadcast_to(lat_mean, (L.shape[0], lat_mean.shape[0]))
            L[:, missing] = lat_members
            latency = latency.copy()
            latency[missing] = lat_mean
        X = to_matrix(self._prepare(features, latency), self.feature_names)
        return np.exp(self._member_log_predictions(X)) * L

    def predict(self, features: Sequence[Mapping[str, float]], latency_s=None) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) per row in the target's units: the geometric mean of the members and the
        standard deviation of their predictions. In power mode, ``latency_s`` (measured; None or NaN
        entries allowed) multiplies the predicted power; rows without it use the latency model."""
        members = self.predict_members(features, latency_s)
        if members.shape[1] == 0:
            return np.zeros(0), np.zeros(0)
        if self.anchor and self.center == "anchor":
            mean = members[0]
            std = np.sqrt(((members - mean) ** 2).mean(axis=0)) if members.shape[0] > 1 else np.zeros_like(mean)
        else:
            mean = np.exp(np.log(members).mean(axis=0))
            std = members.std(axis=0)
        return mean, std

    def evaluate(self, features, y, latency_s=None, k: int = 10) -> dict:
        """MAPE, Spearman and top-k recall of this model's predictions against measured ``y``."""
        from . import metrics

        mean, std = self.predict(features, latency_s)
        return metrics.summary(mean, y, k=k)

    def feature_importance(self, kind: str = "gain") -> dict[str, float]:
        """Mean importance per feature over the members."""
        totals: dict[str, float] = {}
        for booster in self.members:
            for key, value in booster.get_score(importance_type=kind).items():
                name = self.feature_names[int(key[1:])] if key.startswith("f") and key[1:].isdigit() else key
                totals[name] = totals.get(name, 0.0) + value / len(self.members)
        return dict(sorted(totals.items(), key=lambda kv: -kv[1]))

    # -- persistence ---------------------------------------------------------------------------
    def to_json(self, include_data: bool = True) -> dict:
        return {
            "format": "etune.energy_model.CostModel", "version": FORMAT_VERSION,
            "target": self.target, "mode": self.mode, "ensemble": self.ensemble, "seed": self.seed,
            "weighted": self.weighted, "weight_floor": self.weight_floor, "weight_power": self.weight_power,
            "params": self.params, "warm_rounds": self.warm_rounds,
            "augment_missing_build": self.augment_missing_build, "n_jobs": self.n_jobs, "n_fits": self.n_fits,
            "resample": self.resample, "anchor": self.anchor, "center": self.center, "offset": self.offset,
            "latency_features": self.latency_features, "relative": self.relative, "baseline": self.baseline,
            "feature_names": self.feature_names,
            "members_ubj_base64": [base64.b64encode(bytes(b.save_raw(raw_format="ubj"))).decode("ascii")
                                   for b in self.members],
            "latency_model": self.latency_model.to_json(include_data=False) if self.latency_model else None,
            "data": self.data.to_json(self.feature_names) if include_data and self.data and self.feature_names
            else None,
        }

    def save(self, path: str | Path, include_data: bool = True) -> Path:
        """One JSON file (settings, feature names, members in XGBoost UBJSON as base64, and the
        training data unless ``include_data=False``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(include_data)))
        tmp.replace(path)
        return path

    @classmethod
    def from_json(cls, data: dict) -> "CostModel":
        import xgboost as xgb

        if data.get("format") != "etune.energy_model.CostModel":
            raise ModelError("not an etune CostModel file")
        if data.get("version", 0) > FORMAT_VERSION:
            raise ModelError(f"model file version {data['version']} is newer than this etune ({FORMAT_VERSION})")
        model = cls(target=data["target"], mode=data["mode"] if data["target"] == "energy" else None,
                    ensemble=data["ensemble"], seed=data["seed"], weighted=data["weighted"],
                    weight_floor=data["weight_floor"], weight_power=data["weight_power"],
                    warm_rounds=data["warm_rounds"], augment_missing_build=data["augment_missing_build"],
                    resample=data["resample"], anchor=data["anchor"], center=data["center"],
                    latency_features=data["latency_features"], relative=data.get("relative", False),
                    baseline=data.get("baseline", "workload"), n_jobs=data.get("n_jobs", 1), **data["params"])
        model.n_fits = data.get("n_fits", 0)
        model.offset = float(data.get("offset", 0.0))
        model.feature_names = data["feature_names"]
        for raw in data["members_ubj_base64"]:
            booster = xgb.Booster()
            booster.load_model(bytearray(base64.b64decode(raw)))
            model.members.append(booster)
        if data.get("latency_model"):
            model.latency_model = cls.from_json(data["latency_model"])
        if data.get("data"):
            model.data = TrainingData.from_json(data["data"])
        return model

    @classmethod
    def load(cls, path: str | Path) -> "CostModel":
        return cls.from_json(json.loads(Path(path).read_text()))


__all__ = ["CostModel", "DEFAULT_ENERGY_MODE", "ENERGY_MODES", "FEATURE_NAMES", "ModelError", "TARGETS",
           "TrainingData", "efficiency_weights"]
