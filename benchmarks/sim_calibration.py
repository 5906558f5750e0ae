"""Issue 12: how far sim is from a recorded dataset, and sim's constants fitted to it.

A device session records latency and energy of sampled schedules and vendor kernels
(measurements.dataset). This script

1. replays every measured candidate through sim (measurements.sim.simulate) with sim's constants and
   compares, per family (gemm incl. GEMV, softmax, attention), over all candidates, and for the vendor
   kernels as their own group: MAPE of latency, energy and average power, and Spearman rank
   correlation of latency and of energy among one workload's candidates (what the tuner needs: the
   order of schedules of one workload), averaged over the group's workloads;
2. fits a small set of constants that the data can identify, by bounded least squares on
   log(sim / measured): first the latency side (achievable fractions of the DRAM, tensor-core and
   SIMT peaks, accesses in flight per thread) on latencies, then the power side (uncore and per-SM
   active power, energy per DRAM/L2 byte, tensor flop, SIMT op, warp instruction) on energies, then
   all of them together on both (over the power cap, power constants change latency too).
   Constants stay physical: within bounds, and weakly pulled toward sim's defaults so that one the
   data does not constrain stays where it was.
   Only candidates are fitted; vendor kernels are a roofline at fixed efficiencies, a different
   model, and are reported as a check;
3. reports before and after as JSON and Markdown (``--out``), and prints the Markdown.

A dataset made by a sim dry run (header ``backend: sim``) only tests this code on sim's own figures;
the report says so. Idle power comes from the dataset's recorded ``idle_power_w``, and the power cap
from the recorded ``power_limit_w``. Without a recorded idle power, idle power is fitted in place of
``uncore_active_w``: both are watts over the whole call, so the data only sees their sum.

    python benchmarks/sim_calibration.py data/hw/2026-12-01-h200.jsonl.gz --out $OUT/calibration
    python benchmarks/sim_calibration.py /tmp/etune-dry/dataset.jsonl --families gemm softmax

In code: ``samples = load_samples(load_dataset(path))``, ``params, idle_w, report = fit(samples)``,
then ``simulate(launches, workload, dataclasses.replace(gpu, idle_w=idle_w), params)``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from etune.measurements.dataset import Dataset, DatasetError, load_dataset  # noqa: E402
from etune.measurements.sim import SimParams, params_for, simulate, vendor_outcome  # noqa: E402

FAMILIES = ("gemm", "softmax", "attention")
VENDOR = "vendor"
CANDIDATES = "candidates"  # the group of all candidates
# Log-residual given to a prediction sim refuses (constants that put static power above the cap).
FAILED_RESIDUAL = 5.0
# Weight of the pull toward sim's defaults, per unit of log(value / default): small against the data
# (a record 10 % off weighs 0.1; a constant twice its default, 0.002), enough to hold one that the
# data does not move.
PRIOR_WEIGHT = 0.003
# Sensitivity (RMS change of the log-residuals per unit change of log(constant)) below which the
# report calls a constant weakly identified: doubling it would move predictions by < ~0.7 %.
WEAK_SENSITIVITY = 0.01


@dataclasses.dataclass(frozen=True)
class Constant:
    """A fitted constant of SimParams (or ``idle_w`` of the GpuSpec) and its physical bounds:
    absolute, or as factors of the default when ``relative``."""

    name: str
    lower: float
    upper: float
    relative: bool = False

    def bounds(self, default: float) -> tuple[float, float]:
        return (self.lower * default, self.upper * default) if self.relative else (self.lower, self.upper)


# Efficiency side: what sets the latency of sampled schedules (most are latency- or DRAM-bound).
LATENCY_CONSTANTS = (
    Constant("dram_efficiency", 0.5, 0.95),
    Constant("tensor_core_efficiency", 0.3, 0.9),
    Constant("simt_efficiency", 0.3, 1.0),
    Constant("loads_in_flight_per_thread", 0.25, 4.0, relative=True),
    # how much a tensor-core warp's independent accumulators count for latency hiding (1: not at all)
    Constant("max_warp_ilp", 1.0, 4.0),
)
# Power side: static power while a call runs and energy per operation (joules or watts, >= 0).
POWER_CONSTANTS = tuple(Constant(name, 0.25, 4.0, relative=True) for name in (
    "uncore_active_w", "sm_active_w", "sm_warp_w", "dram_byte_j", "l2_byte_j", "tensor_flop_j", "simt_op_j",
    "warp_instruction_j"))
IDLE = Constant("idle_w", 20.0, 250.0)


# -- the records ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Sample:
    """One measured record with what sim needs to predict it."""

    spec: str
    family: str
    key: str  # structural hash, or "vendor"
    workload: object
    launches: list | None  # None for a vendor kernel
    latency_s: float | None  # measured; None where not measured
    energy_j: float | None
    power_w: float | None

    @property
    def group(self) -> str:
        return VENDOR if self.launches is None else self.family

    def predict(self, params: SimParams, gpu):
        if self.launches is None:
            return vendor_outcome(self.workload, gpu, params)
        return simulate(self.launches, self.workload, gpu, params)


@dataclasses.dataclass
class Samples:
    """A dataset's measured records, replayed once (building schedule spaces is the slow part)."""

    dataset: Dataset
    gpu: object  # GpuSpec with the recorded power cap and idle power
    idle_recorded: bool
    items: list[Sample]
    skipped: dict[str, int]  # why -> how many records

    @property
    def candidates(self) -> list[Sample]:
        return [s for s in self.items if s.launches is not None]


def dataset_gpu(header: dict):
    """The GpuSpec preset of the dataset's target (else of the GPU's name: a ``local`` target is
    whatever GPU the session had), with the recorded power cap."""
    from etune.search_space.targets import PRESETS

    target = str(header.get("target") or "").lower()
    if target not in PRESETS:
        name = str(header.get("gpu") or "").lower()
        target = next((key for key in PRESETS if key in name), None)
        if target is None:
            raise DatasetError(f"the dataset's GPU ({header.get('gpu')!r}, target {header.get('target')!r}) "
                               f"matches no preset ({', '.join(PRESETS)})")
    gpu = PRESETS[target]
    cap = (header.get("device") or {}).get("power_limit_w")
    return dataclasses.replace(gpu, tdp_w=float(cap)) if cap else gpu


def _value(row: dict | None) -> float | None:
    return float(row["value"]) if row is not None and row["value"] > 0 else None


def _power(row: dict | None) -> float | None:
    if row is None:
        return None
    details = row.get("details") or {}
    if details.get("avg_power_w"):
        return float(details["avg_power_w"])
    return row["value"] / details["latency_s"] if details.get("latency_s") else None


def load_samples(dataset: Dataset | str | Path, families=None, log=None) -> Samples:
    """Every record of ``families`` (default all) with a measured latency or energy, its candidate
    replayed from the recorded trace on the dataset's target."""
    from etune.kernels import as_workload
    from etune.search_space import ScheduleSpace
    from etune.search_space.space import TVM_ERRORS

    if not isinstance(dataset, Dataset):
        dataset = load_dataset(dataset)
    gpu = dataset_gpu(dataset.header)
    families = tuple(families or FAMILIES)
    records = [r for r in dataset.records().values() if r.measured("latency") or r.measured("energy")]
    skipped: dict[str, int] = {}

    def skip(why: str) -> None:
        skipped[why] = skipped.get(why, 0) + 1

    items: list[Sample] = []
    for spec in dict.fromkeys(r.spec for r in records):
        family = spec.split(":")[0]
        if family not in families:
            continue
        mine = [r for r in records if r.spec == spec]
        try:
            workload = as_workload(spec)
        except ValueError:
            for _ in mine:
                skip("unknown workload spec")
            continue
        space = None  # built only when the spec has candidates to replay
        started = time.monotonic()
        for record in mine:
            latency, energy = record.measured("latency"), record.measured("energy")
            if record.structural_hash is None:
                launches = None
            elif record.candidate is None:
                skip("measurement without its candidate row")
                continue
            else:
                if space is None:
                    space = ScheduleSpace(workload, gpu)
                try:
                    row = record.candidate
                    launches = space.from_trace_json(row["trace"], row["design_space"]).launches
                except TVM_ERRORS:
                    skip("trace does not replay")
                    continue
                if not launches:
                    skip("no kernel launches")
                    continue
            items.append(Sample(spec, family, record.structural_hash or VENDOR, workload, launches,
                                _value(latency), _value(energy), _power(energy)))
        if log:
            log(f"{spec}: {len(mine)} record(s) ({time.monotonic() - started:.1f} s)")
    if not items:
        raise DatasetError(f"{dataset.path} has no measured record of {', '.join(families)}")
    idles = [r["details"]["idle_power_w"] for r in dataset.of_type("measurement")
             if r.get("kind") == "energy" and (r.get("details") or {}).get("idle_power_w")]
    if idles:
        gpu = dataclasses.replace(gpu, idle_w=float(statistics.median(idles)))
    return Samples(dataset, gpu, bool(idles), items, skipped)


def _as_samples(samples) -> Samples:
    return samples if isinstance(samples, Samples) else load_samples(samples)


# -- comparing ---------------------------------------------------------------------------------------
def _mape(predicted: list[float], measured: list[float]) -> float | None:
    pairs = [(p, m) for p, m in zip(predicted, measured) if p is not None and m is not None]
    return float(np.mean([abs(p / m - 1.0) for p, m in pairs])) if pairs else None


def _spearman(predicted: list[float], measured: list[float]) -> float | None:
    """Spearman's rho (ranks with ties averaged); None below three pairs or without spread."""
    import pandas as pd

    pairs = [(p, m) for p, m in zip(predicted, measured) if p is not None and m is not None]
    if len(pairs) < 3:
        return None
    rho = pd.Series([p for p, _ in pairs]).corr(pd.Series([m for _, m in pairs]), method="spearman")
    return None if math.isnan(rho) else float(rho)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _errors(rows: list[dict]) -> dict:
    """Error figures of a group of rows (each: spec, predicted and measured latency/energy/power)."""
    # A record sim cannot predict (constants that put static power above the cap) is counted, not averaged.
    result = {"n": len(rows), "sim_failed": sum(r["sim_latency"] is None for r in rows)}
    for kind in ("latency", "energy", "power"):
        predicted = [r[f"sim_{kind}"] for r in rows]
        measured = [r[f"measured_{kind}"] for r in rows]
        result[f"n_{kind}"] = sum(m is not None for m in measured)
        result[f"{kind}_mape"] = _mape(predicted, measured)
    for kind in ("latency", "energy"):
        by_spec = {}
        for spec in dict.fromkeys(r["spec"] for r in rows):
            mine = [r for r in rows if r["spec"] == spec]
            by_spec[spec] = _spearman([r[f"sim_{kind}"] for r in mine], [r[f"measured_{kind}"] for r in mine])
        # Within a workload: the tuner ranks schedules of one workload.
        result[f"{kind}_spearman"] = _mean(by_spec.values())
        # Across the group: also ranks workloads by size, so it is high even for a poor model.
        result[f"{kind}_spearman_pooled"] = _spearman([r[f"sim_{kind}"] for r in rows],
                                                      [r[f"measured_{kind}"] for r in rows])
    return result


def compare(samples, params: SimParams | None = None, idle_w: float | None = None) -> dict:
    """sim's errors against the measured records, by group (families, all candidates, vendor kernels)
    and by workload. ``samples``: Samples, a Dataset or a path; ``idle_w``: default the recorded."""
    samples = _as_samples(samples)
    gpu = samples.gpu if idle_w is None else dataclasses.replace(samples.gpu, idle_w=idle_w)
    params = params or params_for(gpu)
    rows = []
    for s in samples.items:
        try:
            outcome = s.predict(params, gpu)
        except (ValueError, ZeroDivisionError, OverflowError):
            outcome = None
        rows.append({"spec": s.spec, "group": s.group, "key": s.key,
                     "measured_latency": s.latency_s, "measured_energy": s.energy_j, "measured_power": s.power_w,
                     "sim_latency": outcome.latency_s if outcome else None,
                     "sim_energy": outcome.energy_j if outcome else None,
                     "sim_power": outcome.avg_power_w if outcome else None})
    groups = {}
    for group in (*FAMILIES, CANDIDATES, VENDOR):
        mine = [r for r in rows if r["group"] == group or (group == CANDIDATES and r["group"] != VENDOR)]
        if mine:
            groups[group] = _errors(mine)
    workloads = {spec: _errors([r for r in rows if r["spec"] == spec and r["group"] != VENDOR])
                 for spec in dict.fromkeys(r["spec"] for r in rows if r["group"] != VENDOR)}
    return {"groups": groups, "workloads": workloads, "records": rows}


# -- fitting -----------------------------------------------------------------------------------------
class Fitted(NamedTuple):
    params: SimParams
    idle_w: float
    report: dict


def _apply(constants, x, params: SimParams, gpu):
    """SimParams and GpuSpec with each constant at its value in (params, gpu) times exp(x): the fit
    works in log space, where a factor of two is the same step for watts and for picojoules."""
    values = {c.name: _value_of(c.name, params, gpu) * math.exp(v) for c, v in zip(constants, x)}
    idle = values.pop(IDLE.name, gpu.idle_w)
    return dataclasses.replace(params, **values), dataclasses.replace(gpu, idle_w=idle)


def _value_of(name: str, params: SimParams, gpu) -> float:
    return gpu.idle_w if name == IDLE.name else getattr(params, name)


def _log_errors(items: list[Sample], params: SimParams, gpu, kinds) -> list[float]:
    """log(sim / measured) of every measured figure of ``kinds`` (fixed length for fixed items)."""
    out = []
    for s in items:
        try:
            outcome = s.predict(params, gpu)
        except (ValueError, ZeroDivisionError, OverflowError):
            outcome = None
        for kind in kinds:
            measured = s.latency_s if kind == "latency" else s.energy_j
            if measured is None:
                continue
            predicted = None if outcome is None else (outcome.latency_s if kind == "latency" else outcome.energy_j)
            out.append(math.log(predicted / measured) if predicted and predicted > 0 else FAILED_RESIDUAL)
    return out


def _least_squares(items, constants, params: SimParams, gpu, defaults: dict, kinds, prior_weight: float):
    """Fit ``constants``, starting from their values in (params, gpu), to the log-errors of ``kinds``.
    ``defaults`` (name -> sim's default) set the bounds and what the prior pulls toward. Returns the
    new params and gpu, and each constant's sensitivity at the solution."""
    from scipy.optimize import least_squares  # scipy comes with scikit-learn, a dependency

    start = np.array([_value_of(c.name, params, gpu) for c in constants])
    reference = np.array([defaults[c.name] for c in constants])
    lower = np.log([c.bounds(d)[0] for c, d in zip(constants, reference)] / start)
    upper = np.log([c.bounds(d)[1] for c, d in zip(constants, reference)] / start)
    toward = np.log(reference / start)

    def residuals(x):
        p, g = _apply(constants, x, params, gpu)
        return np.concatenate([_log_errors(items, p, g, kinds), prior_weight * (x - toward)])

    x0 = np.clip(np.zeros(len(constants)), lower, upper)
    result = least_squares(residuals, x0, bounds=(lower, upper), diff_step=1e-6, xtol=1e-10, ftol=1e-10,
                           gtol=1e-10, max_nfev=200)
    data_rows = np.asarray(result.jac)[: len(result.fun) - len(constants)]
    sensitivity = np.sqrt((data_rows ** 2).mean(axis=0)) if len(data_rows) else np.zeros(len(constants))
    p, g = _apply(constants, result.x, params, gpu)
    return p, g, {c.name: float(v) for c, v in zip(constants, sensitivity)}


def fit(samples, params: SimParams | None = None, prior_weight: float = PRIOR_WEIGHT) -> Fitted:
    """sim's constants fitted to the measured candidates: (params, idle power, report).

    Three stages of bounded least squares on log(sim / measured): latency constants on latencies,
    power constants on energies (idle power in place of uncore power when the dataset did not
    record it), then all of them on both.
    ``params``: the constants to start from and to pull toward (default sim's for the GPU).
    """
    samples = _as_samples(samples)
    gpu = samples.gpu
    params = params or params_for(gpu)
    items = samples.candidates
    if not items:
        raise DatasetError("no measured candidate to fit sim's constants to")
    power_constants = POWER_CONSTANTS
    if not samples.idle_recorded:  # the data sees idle + uncore power only as their sum
        power_constants = tuple(IDLE if c.name == "uncore_active_w" else c for c in POWER_CONSTANTS)
    every = LATENCY_CONSTANTS + power_constants
    defaults = {c.name: _value_of(c.name, params, gpu) for c in every}
    started = time.monotonic()
    p, g, _ = _least_squares(items, LATENCY_CONSTANTS, params, gpu, defaults, ("latency",), prior_weight)
    p, g, _ = _least_squares(items, power_constants, p, g, defaults, ("energy",), prior_weight)
    p, g, sensitivity = _least_squares(items, every, p, g, defaults, ("latency", "energy"), prior_weight)
    constants = {}
    for c in every:
        default, value = defaults[c.name], _value_of(c.name, p, g)
        lower, upper = c.bounds(default)
        constants[c.name] = {"default": default, "fitted": value, "ratio": value / default,
                             "bounds": [lower, upper], "sensitivity": sensitivity[c.name],
                             "at_bound": bool(value <= lower * (1 + 1e-6) or value >= upper * (1 - 1e-6)),
                             "weakly_identified": sensitivity[c.name] < WEAK_SENSITIVITY}
    report = {"constants": constants,
              "idle_w": {"value": g.idle_w, "recorded": samples.idle_recorded,
                         "preset": None if samples.idle_recorded else gpu.idle_w},
              "fitted_records": len(items), "prior_weight": prior_weight, "seconds": time.monotonic() - started}
    return Fitted(p, g.idle_w, report)


# -- the report --------------------------------------------------------------------------------------
def calibrate(samples: Samples) -> dict:
    """Compare, fit, compare again: the whole JSON document."""
    header = samples.dataset.header
    before = compare(samples)
    params, idle_w, fitted = fit(samples)
    after = compare(samples, params, idle_w)
    return {
        "dataset": str(samples.dataset.path),
        "header": {k: header.get(k) for k in ("backend", "gpu", "target", "date", "driver", "host", "dry_run")},
        "sim_made": header.get("backend") == "sim",
        "truncated": samples.dataset.truncated,
        "gpu": {"preset": samples.gpu.name, "power_cap_w": samples.gpu.tdp_w},
        "records": len(samples.items), "skipped": samples.skipped,
        "before": {k: before[k] for k in ("groups", "workloads")},
        "after": {k: after[k] for k in ("groups", "workloads")},
        "fit": fitted,
        "records_detail": {"before": before["records"], "after": after["records"]},
    }


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _rho(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _change(before, after, key: str, show) -> str:
    if before.get(key) is None and after.get(key) is None:
        return "-"
    return f"{show(before.get(key))} -> {show(after.get(key))}"


def markdown(document: dict) -> str:
    header = document["header"]
    lines = [f"# sim calibration: {document['dataset']}", ""]
    if document["sim_made"]:
        lines += ["**This dataset was made by sim (header backend `sim`), not measured on a GPU. This run tests "
                  "the calibration code on sim's own figures; it is not a calibration of sim against hardware.**",
                  ""]
    idle = document["fit"]["idle_w"]
    idle_source = "recorded" if idle["recorded"] else f"fitted; sim's preset {idle['preset']:g} W"
    lines += [f"Backend `{header['backend']}`, GPU {header['gpu']} (target `{header['target']}`), recorded "
              f"{header['date']}. {document['records']} records; power cap {document['gpu']['power_cap_w']:g} W; "
              f"idle power {idle['value']:.1f} W ({idle_source})."
              + (f" Skipped: {', '.join(f'{n} {why}' for why, n in document['skipped'].items())}."
                 if document["skipped"] else "")
              + (" The dataset's last line was torn (a session cut off) and is left out."
                 if document["truncated"] else ""),
              "",
              "Errors of sim with its default constants -> with the fitted constants. MAPE: mean absolute "
              "percentage error. rho: Spearman rank correlation among one workload's candidates, averaged "
              "over the group's workloads. Only candidates are fitted; vendor kernels are a check.", "",
              "| group | n | latency MAPE | energy MAPE | power MAPE | latency rho | energy rho |",
              "|---|---|---|---|---|---|---|"]

    def table_rows(before: dict, after: dict):
        for name, b in before.items():
            a = after[name]
            yield (f"| {name} | {b['n']} | {_change(b, a, 'latency_mape', _pct)} | "
                   f"{_change(b, a, 'energy_mape', _pct)} | {_change(b, a, 'power_mape', _pct)} | "
                   f"{_change(b, a, 'latency_spearman', _rho)} | {_change(b, a, 'energy_spearman', _rho)} |")

    lines += table_rows(document["before"]["groups"], document["after"]["groups"])
    lines += ["", "| workload | n | latency MAPE | energy MAPE | power MAPE | latency rho | energy rho |",
              "|---|---|---|---|---|---|---|"]
    lines += table_rows(document["before"]["workloads"], document["after"]["workloads"])
    lines += ["", f"Fitted constants ({document['fit']['fitted_records']} candidates, "
                  f"{document['fit']['seconds']:.1f} s). Sensitivity: RMS change of log(sim / measured) per unit "
                  f"change of log(constant); below {WEAK_SENSITIVITY:g} the data hardly constrains it and it stays "
                  f"near its default.", "",
              "| constant | default | fitted | fitted / default | bounds | sensitivity |", "|---|---|---|---|---|---|"]
    for name, c in document["fit"]["constants"].items():
        notes = [n for n, on in (("at a bound", c["at_bound"]), ("weakly identified", c["weakly_identified"])) if on]
        lines.append(f"| {name} | {c['default']:.4g} | {c['fitted']:.4g} | {c['ratio']:.3f} | "
                     f"{c['bounds'][0]:.3g} - {c['bounds'][1]:.3g} | {c['sensitivity']:.3g}"
                     f"{' (' + ', '.join(notes) + ')' if notes else ''} |")
    return "\n".join(lines + [""])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path, help="a dataset (.jsonl or .jsonl.gz) of a device session or dry run")
    parser.add_argument("--out", type=Path, default=Path("out/sim_calibration"))
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    args = parser.parse_args(argv)

    started = time.monotonic()
    try:
        samples = load_samples(args.dataset, args.families,
                               log=lambda line: print(f"sim_calibration: {line}", file=sys.stderr))
        document = calibrate(samples)
    except DatasetError as exc:
        print(f"sim_calibration: {exc}", file=sys.stderr)
        return 2
    document["seconds"] = time.monotonic() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sim_calibration.json").write_text(json.dumps(document, indent=2))
    text = markdown(document)
    (args.out / "sim_calibration.md").write_text(text)
    print(text)
    print(f"sim_calibration: {document['seconds']:.1f} s; written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
