"""Accuracy of the energy (and latency) cost models: energy-direct vs power mode, weighted vs not.

For each chosen suite workload: sample ``--train + --test`` distinct valid candidates, measure their
latency and energy on a backend (``sim`` by default; ``nvml`` on a GPU host, which builds them
first), then for several random train/test splits of that pool train each model variant on the
training part and score it on the held-out part:

* MAPE and Spearman of the predicted energy, top-k recall (how many of the true k lowest-energy
  candidates the model's k favourites contain), regret@1 (how much more energy the model's favourite
  uses than the true best), MAPE on the best decile, and how well the ensemble's relative uncertainty
  ranks the actual errors (Spearman of std/mean with |error|).
* Variants: ``energy`` (energy regressed directly from features), ``power`` (average power regressed,
  times the measured latency), ``power|pred-lat`` (power mode with the model's own predicted latency,
  as for candidates not yet built), each weighted (default) and unweighted; optionally with
  MetaSchedule's per-store features appended (``--per-store``); the latency model (its target
  relative to the workload's roofline, the default, or to the candidate's analytic bottleneck time);
  and the model-free baseline ``constant power`` (median training power x measured latency,
  ``energy_model.baselines.ConstantPowerModel``), which the energy model has to beat.
* Within the latency slack (``--slack-seeds``, sim only): random samples are rarely near the fastest,
  where the energy objective chooses, so a latency-tuning run per seed collects near-fastest
  candidates; the benchmark reports how much power varies among those within ``--slack`` of the
  fastest, and the model against the constant-power baseline there (trained on half of them, scored
  on the other half, as the tuner's model is trained on the candidates it measured in the slack).
  It then replays the choice of which of them get an energy measurement, one at a time, under each
  selection rule (``selections``: expected improvement with the model or with constant power, the
  update policy, fastest first, random) and counts the measurements each needs to find the least
  energy in the slack.

Writes ``energy_model_accuracy.json`` and ``energy_model_accuracy.md`` into ``--out``; every table
and number carries the backend it was measured on (sim numbers are never hardware results).

    python benchmarks/energy_model_accuracy.py --out out/energy_model_accuracy
    python benchmarks/energy_model_accuracy.py --workloads gemm-4096 softmax-4096x4096 attention-decode-4096
    python benchmarks/energy_model_accuracy.py --workloads gemv-4096 gemm-4096 softmax-4096x4096 \
        attention-decode-4096 --slack-seeds 1 2 --pool-cache out/pools
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from etune.energy_model import metrics  # noqa: E402
from etune.energy_model.baselines import ConstantPowerModel  # noqa: E402
from etune.energy_model.policy import (ExpectedImprovementPolicy, FastestFirstPolicy, RandomPolicy,  # noqa: E402
                                       UpdatePolicy)
from etune.energy_model.features import candidate_features, per_store_features  # noqa: E402
from etune.energy_model.model import DEFAULT_ENERGY_MODE, CostModel  # noqa: E402

DEFAULT_WORKLOADS = ("gemm-4096", "softmax-4096x4096")
CONSTANT_LABEL = "constant power (baseline)"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure_pool(name: str, args) -> dict:
    """Sample candidates of one suite workload, measure latency and energy, compute features."""
    from etune.kernels import SUITE_SPECS
    from etune.measurements import make_backend
    from etune.search_space import Builder, ScheduleSpace, gpu_spec

    spec = SUITE_SPECS.get(name, name)
    gpu = gpu_spec(args.gpu)
    started = time.perf_counter()
    space = ScheduleSpace(spec, gpu, seed=args.seed)
    want = args.train + args.test
    candidates = space.sample(want + args.spare, seed=args.seed)
    sample_s = time.perf_counter() - started
    log(f"{spec}: {len(candidates)} candidates sampled in {sample_s:.0f} s")
    builds = None
    backend = make_backend(args.backend, gpu=args.gpu, **({"seed": args.seed} if args.backend == "sim" else {}))
    with backend:
        device = backend.device()
        if backend.name != "sim":
            builder = Builder(gpu, workdir=args.out / "builds")
            builds = builder.build(candidates)
            ok = [i for i, b in enumerate(builds) if b.ok]
            candidates, builds = [candidates[i] for i in ok], [builds[i] for i in ok]
            log(f"{spec}: {len(candidates)} built")
        started = time.perf_counter()
        latency = backend.measure(candidates, "latency", builds=builds)
        energy = backend.measure(candidates, "energy", builds=builds)
        measure_s = time.perf_counter() - started
    rows = []
    for i, (c, lat, en) in enumerate(zip(candidates, latency, energy)):
        if not (lat.ok and en.ok and lat.value and en.value):
            continue
        f = candidate_features(c, gpu, build=builds[i] if builds else None)
        if args.per_store:
            f.update(per_store_features(c, gpu))
        rows.append({"hash": c.structural_hash, "features": f, "latency_s": lat.value, "energy_j": en.value,
                     "design_space": c.design_space, "trace": c.trace_json()})
    rows = rows[:want]
    if len(rows) < want:
        log(f"{spec}: only {len(rows)} of {want} candidates measured; using them all")
    energy_values = np.array([r["energy_j"] for r in rows])
    return {"name": name, "spec": spec, "family": space.workload.family, "rows": rows, "sample_s": sample_s,
            "measure_s": measure_s, "device": {"backend": device.backend, "name": device.name},
            "energy_spread": float(energy_values.max() / energy_values.min()) if rows else math.nan}


def refeature(pool: dict, args) -> None:
    """Features again from the stored traces (after a change to energy_model.features)."""
    from etune.search_space import ScheduleSpace, gpu_spec

    gpu = gpu_spec(args.gpu)
    space = ScheduleSpace(pool["spec"], gpu, seed=args.seed)
    for row in pool["rows"]:
        candidate = space.from_trace_json(row["trace"], row["design_space"])
        row["features"] = candidate_features(candidate, gpu)
        if args.per_store:
            row["features"].update(per_store_features(candidate, gpu))
    log(f"{pool['spec']}: features recomputed for {len(pool['rows'])} candidates")


def variants(per_store: bool):
    out = []
    for mode in ("energy", "power"):
        for weighted in (True, False):
            out.append({"label": f"{mode}{'' if weighted else ' unweighted'}", "mode": mode, "weighted": weighted,
                        "latency": "measured", "per_store": False})
    out.append({"label": "power|pred-lat", "mode": "power", "weighted": True, "latency": "predicted",
                "per_store": False})
    out.append({"label": CONSTANT_LABEL, "mode": "constant", "weighted": False, "latency": "measured",
                "per_store": False})
    if per_store:
        for mode in ("energy", "power"):
            out.append({"label": f"{mode} +per-store", "mode": mode, "weighted": True, "latency": "measured",
                        "per_store": True})
    return out


def _strip(features: dict, per_store: bool) -> dict:
    return features if per_store else {k: v for k, v in features.items() if not k.startswith("ms_")}


def evaluate(pool: dict, args) -> dict:
    rows = pool["rows"]
    n_train = min(args.train, len(rows) // 2)
    results: dict[str, list[dict]] = {}
    for split in range(args.splits):
        order = np.random.default_rng(1000 + split).permutation(len(rows))
        train = [rows[i] for i in order[:n_train]]
        test = [rows[i] for i in order[n_train:]]
        truth = np.array([r["energy_j"] for r in test])
        low = truth <= np.quantile(truth, 0.1)
        for v in variants(args.per_store):
            started = time.perf_counter()
            model = ConstantPowerModel(seed=split) if v["mode"] == "constant" else \
                CostModel("energy", mode=v["mode"], weighted=v["weighted"], seed=split, ensemble=args.ensemble)
            model.fit([_strip(r["features"], v["per_store"]) for r in train], [r["energy_j"] for r in train],
                      latency_s=[r["latency_s"] for r in train])
            fit_s = time.perf_counter() - started
            latency = [r["latency_s"] for r in test] if v["latency"] == "measured" else None
            pred, std = model.predict([_strip(r["features"], v["per_store"]) for r in test], latency_s=latency)
            results.setdefault(v["label"], []).append(_scores(pred, std, truth, low, args.k, fit_s))
        # The latency model (what ranks unbuilt candidates), on the workload's roofline or on the
        # candidate's analytic bottleneck time as the baseline of its target.
        lat_truth = np.array([r["latency_s"] for r in test])
        for baseline, label in (("workload", "latency model"), ("bottleneck", "latency model, bottleneck baseline")):
            started = time.perf_counter()
            model = CostModel("latency", seed=split, ensemble=args.ensemble, baseline=baseline)
            model.fit([_strip(r["features"], False) for r in train], [r["latency_s"] for r in train])
            fit_s = time.perf_counter() - started
            pred, std = model.predict([_strip(r["features"], False) for r in test])
            results.setdefault(label, []).append(
                _scores(pred, std, lat_truth, lat_truth <= np.quantile(lat_truth, 0.1), args.k, fit_s))
    return {label: _mean(runs) for label, runs in results.items()}


def importances(pool: dict, args, top: int = 10) -> dict:
    """Top features (mean gain over the members) of each energy mode, trained on the first split."""
    rows = pool["rows"]
    order = np.random.default_rng(1000).permutation(len(rows))
    train = [rows[i] for i in order[: min(args.train, len(rows) // 2)]]
    out = {}
    for mode in ("energy", "power"):
        model = CostModel("energy", mode=mode, seed=0, ensemble=args.ensemble)
        model.fit([_strip(r["features"], False) for r in train], [r["energy_j"] for r in train],
                  latency_s=[r["latency_s"] for r in train])
        out[mode] = {k: round(v, 4) for k, v in list(model.feature_importance().items())[:top]}
    return out


def transfer(source: dict, target: dict, args) -> dict:
    """A model trained on every measured candidate of ``source`` meets a new shape ``target``:
    zero-shot, boosted on (warm start), refitted with the old data, or trained from scratch, for
    growing numbers of new measurements. Scored on a held-out part of ``target`` (mean over splits)."""
    results: dict[str, dict[int, list]] = {}
    for split in range(args.splits):
        rows = target["rows"]
        order = np.random.default_rng(2000 + split).permutation(len(rows))
        held_out = [rows[i] for i in order[len(rows) - args.test:]] if len(rows) > args.test else \
            [rows[i] for i in order[len(rows) // 2:]]
        pool = [rows[i] for i in order[: len(rows) - len(held_out)]]
        truth = np.array([r["energy_j"] for r in held_out])
        base = CostModel("energy", seed=split, ensemble=args.ensemble)
        base.fit([_strip(r["features"], False) for r in source["rows"]], [r["energy_j"] for r in source["rows"]],
                 latency_s=[r["latency_s"] for r in source["rows"]])
        saved = args.out / "transfer_base.json"
        base.save(saved)

        def score(model):
            pred, _ = model.predict([_strip(r["features"], False) for r in held_out],
                                    latency_s=[r["latency_s"] for r in held_out])
            return metrics.summary(pred, truth, k=args.k)

        results.setdefault("zero-shot", {}).setdefault(0, []).append(score(CostModel.load(saved)))
        for n in args.transfer_sizes:
            new = pool[:n]
            f = [_strip(r["features"], False) for r in new]
            y = [r["energy_j"] for r in new]
            lat = [r["latency_s"] for r in new]
            results.setdefault("boost", {}).setdefault(n, []).append(
                score(CostModel.load(saved).update(f, y, lat, how="boost")))
            results.setdefault("refit", {}).setdefault(n, []).append(
                score(CostModel.load(saved).update(f, y, lat, how="refit")))
            results.setdefault("scratch", {}).setdefault(n, []).append(
                score(CostModel("energy", seed=split, ensemble=args.ensemble).fit(f, y, lat)))
    return {how: {str(n): _mean(runs) for n, runs in by_n.items()} for how, by_n in results.items()}


def slack_pool(name: str, seed: int, args) -> dict:
    """Every candidate a latency-tuning run on sim measured, with latency and energy measured again on
    one sim backend (the run's own database is kept beside the pools, so a second call resumes it)."""
    from etune.kernels import SUITE_SPECS
    from etune.measurements.records import RecordsDB
    from etune.measurements.sim import SimBackend
    from etune.search_space import ScheduleSpace, gpu_spec
    from etune.tuner.search import tune

    spec = SUITE_SPECS.get(name, name)
    gpu = gpu_spec(args.gpu)
    folder = args.pool_cache or args.out
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / f"latency-{_slug(name)}-sim-seed{seed}.db"  # more trials later resume this run
    started = time.perf_counter()
    tune(spec, "latency", backend="sim", db=db, gpu=args.gpu, trials=args.slack_trials, batch=16, build=False,
         seed=seed)
    space = ScheduleSpace(spec, gpu, seed=seed)
    with RecordsDB.open(db) as records:
        workload_id = records.add_workload(space.workload.spec, space.workload.family, space.workload.params)
        stored = records.candidates(workload_id)
    candidates = [space.from_trace_json(row.trace, row.design_space) for row in stored]
    backend = SimBackend(gpu=args.gpu, seed=seed)
    latency = backend.measure(candidates, "latency")
    energy = backend.measure(candidates, "energy")
    rows = [{"hash": c.structural_hash, "features": candidate_features(c, gpu), "latency_s": lat.value,
             "energy_j": en.value} for c, lat, en in zip(candidates, latency, energy) if lat.ok and en.ok]
    log(f"{spec}: {len(rows)} candidates of a {args.slack_trials}-trial latency run (seed {seed}) "
        f"in {time.perf_counter() - started:.0f} s")
    return {"name": name, "spec": spec, "seed": seed, "rows": rows, "device": backend.device().name}


def evaluate_in_slack(pool: dict, args) -> dict:
    """How much power varies within the slack of the fastest, and the energy model against the
    constant-power baseline there: trained on half of the candidates within the slack, scored on the rest."""
    rows = pool["rows"]
    fastest = min(r["latency_s"] for r in rows)
    within = [r for r in rows if r["latency_s"] <= (1 + args.slack) * fastest]
    energy = np.array([r["energy_j"] for r in within])
    latency = np.array([r["latency_s"] for r in within])
    power = energy / latency
    out = {"name": pool["name"], "spec": pool["spec"], "seed": pool["seed"], "candidates": len(rows),
           "within_slack": len(within), "fastest_s": fastest,
           "power_min_w": float(power.min()), "power_max_w": float(power.max()),
           "power_cv": float(power.std() / power.mean()),
           "fastest_energy_j": float(min(within, key=lambda r: r["latency_s"])["energy_j"]),
           "least_energy_j": float(energy.min()),
           "latency_energy_spearman": metrics.spearman(latency, energy) if len(within) > 2 else math.nan}
    out["saving_over_fastest"] = 1 - out["least_energy_j"] / out["fastest_energy_j"]
    if len(within) < 8:
        return out
    scores: dict[str, list[dict]] = {}
    for split in range(args.splits):
        order = np.random.default_rng(3000 + split).permutation(len(within))
        train = [within[i] for i in order[: len(within) // 2]]
        test = [within[i] for i in order[len(within) // 2:]]
        truth = np.array([r["energy_j"] for r in test])
        for label, model in (("power (default)", CostModel("energy", seed=split, ensemble=args.ensemble)),
                             (CONSTANT_LABEL, ConstantPowerModel(seed=split))):
            model.fit([r["features"] for r in train], [r["energy_j"] for r in train],
                      latency_s=[r["latency_s"] for r in train])
            pred, _ = model.predict([r["features"] for r in test], latency_s=[r["latency_s"] for r in test])
            scores.setdefault(label, []).append({"mape": metrics.mape(pred, truth),
                                                 "spearman": metrics.spearman(pred, truth),
                                                 "regret_at_1": metrics.best_regret(pred, truth)})
    out["results"] = {label: _mean(runs) for label, runs in scores.items()}
    out["selection"] = compare_selections(within, args)
    return out


def selections(args) -> dict:
    """label -> (policy, model or None) factories of a seed: the selection rules the replay compares."""
    model = lambda seed: CostModel("energy", seed=seed, ensemble=args.ensemble)  # noqa: E731
    return {
        "expected improvement + model": (lambda seed: ExpectedImprovementPolicy(seed=seed), model),
        "expected improvement + constant power": (lambda seed: ExpectedImprovementPolicy(seed=seed),
                                                  lambda seed: ConstantPowerModel(seed=seed)),
        "update policy + model": (lambda seed: UpdatePolicy(per_batch=1, extra_checks=0, seed=seed), model),
        "fastest first (naive)": (lambda seed: FastestFirstPolicy(seed=seed), None),
        "random": (lambda seed: RandomPolicy(seed=seed), None),
    }


def replay_selection(within: list[dict], policy, model) -> list[float]:
    """The least measured energy after each energy measurement when ``policy`` picks one candidate at
    a time among ``within`` (all latency-measured), the model retrained on everything measured so far
    from the third measurement on (as the tuner does). Stops early when the policy picks nothing."""
    latency = [r["latency_s"] for r in within]
    measured: list[int] = []
    curve: list[float] = []
    while len(measured) < len(within):
        mean = std = None
        if model is not None and len(measured) >= 3:
            model.fit([within[i]["features"] for i in measured], [within[i]["energy_j"] for i in measured],
                      latency_s=[latency[i] for i in measured])
            mean, std = model.predict([r["features"] for r in within], latency_s=latency)
        incumbent = min((within[i]["energy_j"] for i in measured), default=None)
        picked = policy.select(mean, std, latency_s=latency, budget=1, exclude=measured, incumbent=incumbent)
        if not picked:
            break
        if mean is not None:
            policy.observe(mean[picked[0]], within[picked[0]]["energy_j"])
        measured.append(picked[0])
        curve.append(min(within[i]["energy_j"] for i in measured))
    return curve


def compare_selections(within: list[dict], args) -> dict:
    """Per selection rule (random: mean over ``--splits`` seeds): the energy measurements it needs to
    find the least energy within the slack, and the least energy it has after 30 % of the
    measurements the naive way takes (every candidate in the slack)."""
    least = min(r["energy_j"] for r in within)
    early = max(1, round(0.3 * len(within)))
    out = {}
    for label, (make_policy, make_model) in selections(args).items():
        seeds = range(args.splits) if label == "random" else range(1)
        needed, at_early = [], []
        for seed in seeds:
            curve = replay_selection(within, make_policy(seed), make_model(seed) if make_model else None)
            hit = next((n for n, best in enumerate(curve, 1) if best <= least), None)
            needed.append(hit if hit is not None else math.nan)
            at_early.append(curve[min(early, len(curve)) - 1] / least - 1)
        out[label] = {"measurements_to_least": float(np.mean(needed)), "found_least": bool(np.isfinite(needed).all()),
                      "excess_at_30_percent": float(np.mean(at_early))}
    return out


def _slug(name: str) -> str:
    return name.replace(":", "_").replace(",", "x")


def _scores(pred, std, truth, low, k, fit_s) -> dict:
    s = metrics.summary(pred, truth, k=k)
    s["mape_best_decile"] = metrics.mape(pred[low], truth[low])
    errors = np.abs(pred - truth) / truth
    s["uncertainty_error_spearman"] = metrics.spearman(std / pred, errors)
    s["fit_s"] = fit_s
    return s


def _mean(runs: list[dict]) -> dict:
    out = {}
    for key in runs[0]:
        values = np.array([r[key] for r in runs], dtype=np.float64)
        out[key] = float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
        if key in ("mape", "spearman", "top_k_recall"):
            out[key + "_min"] = float(np.nanmin(values))
            out[key + "_max"] = float(np.nanmax(values))
    return out


def markdown(report: dict) -> str:
    lines = [f"# Energy model accuracy (backend: {report['backend']})", ""]
    lines.append(f"Device: {report['device']} (backend: **{report['backend']}**"
                 + ("; an analytic GPU model, not a hardware measurement" if report["backend"] == "sim" else "")
                 + f"). Train {report['train']} / test {report['test']} candidates per split, "
                 f"{report['splits']} random splits (mean; min-max in brackets), ensemble of {report['ensemble']}, "
                 f"top-k with k = {report['k']}. Default energy mode: `{report['default_mode']}`.")
    lines.append("")
    for w in report["workloads"]:
        lines.append(f"## {w['name']} (`{w['spec']}`), backend: {report['backend']}")
        lines.append("")
        lines.append(f"{w['measured']} candidates measured; energy spread max/min {w['energy_spread']:.1f}x; "
                     f"sampling {w['sample_s']:.0f} s, measuring {w['measure_s']:.1f} s.")
        lines.append("")
        lines.append("| model | MAPE | Spearman | top-k recall | regret@1 | MAPE best decile | unc.-error rho | fit s |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for label, s in w["results"].items():
            lines.append(
                f"| {label} | {100 * s['mape']:.1f} % [{100 * s['mape_min']:.1f}-{100 * s['mape_max']:.1f}] "
                f"| {s['spearman']:.3f} [{s['spearman_min']:.3f}-{s['spearman_max']:.3f}] "
                f"| {s['top_k_recall']:.2f} [{s['top_k_recall_min']:.2f}-{s['top_k_recall_max']:.2f}] "
                f"| {100 * s['regret_at_1']:.1f} % | {100 * s['mape_best_decile']:.1f} % "
                f"| {s['uncertainty_error_spearman']:.2f} | {s['fit_s']:.2f} |")
        lines.append("")
        for mode, top in w.get("top_features", {}).items():
            lines.append(f"Top features ({mode} mode, gain): " + ", ".join(f"`{k}`" for k in top) + ".")
        lines.append("")
    if report.get("transfer"):
        t = report["transfer"]
        lines.append(f"## Transfer to a new shape: {t['source']} -> {t['target']}, backend: {t['backend']}")
        lines.append("")
        lines.append(f"A model trained on all measured {t['source']} candidates (default mode), then given n measured "
                     f"candidates of {t['target']}: used as is (zero-shot), boosted on (`update(how='boost')`, warm "
                     "start), refitted on old + new data (`update(how='refit')`, old data weighted 0.5), or a new "
                     f"model trained on the n alone (scratch). Energy MAPE / Spearman on {report['test']} held-out "
                     f"{t['target']} candidates.")
        lines.append("")
        sizes = sorted({int(n) for by_n in t["results"].values() for n in by_n})
        lines.append("| strategy | " + " | ".join(f"n = {n}" for n in sizes) + " |")
        lines.append("|---|" + "---|" * len(sizes))
        for how, by_n in t["results"].items():
            cells = [f"{100 * by_n[str(n)]['mape']:.1f} % / {by_n[str(n)]['spearman']:.3f}" if str(n) in by_n else "-"
                     for n in sizes]
            lines.append(f"| {how} | " + " | ".join(cells) + " |")
        lines.append("")
    if report.get("slack"):
        lines.append(f"## Within {100 * report['slack_fraction']:g} % of the fastest latency, backend: sim")
        lines.append("")
        lines.append(f"Candidates of a {report['slack_trials']}-trial latency-tuning run per seed (near-fastest "
                     f"schedules; random samples rarely are), measured on sim. Power spread and energy among those "
                     f"within the slack; the default model and the constant-power baseline trained on half of them "
                     f"and scored on the rest ({report['splits']} splits).")
        lines.append("")
        lines.append("| workload | seed | in slack / run | power min-max (W) | power CV | fastest's energy -> least "
                     "(saving) | rho(latency, energy) | model MAPE / rho | constant MAPE / rho |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for w in report["slack"]:
            cells = []
            for label in ("power (default)", CONSTANT_LABEL):
                r = w.get("results", {}).get(label)
                cells.append(f"{100 * r['mape']:.2f} % / {r['spearman']:.2f}" if r else "-")
            lines.append(f"| {w['name']} | {w['seed']} | {w['within_slack']} / {w['candidates']} "
                         f"| {w['power_min_w']:.0f}-{w['power_max_w']:.0f} | {100 * w['power_cv']:.1f} % "
                         f"| {1e3 * w['fastest_energy_j']:.3f} -> {1e3 * w['least_energy_j']:.3f} mJ "
                         f"({100 * w['saving_over_fastest']:.1f} %) | {w['latency_energy_spearman']:.2f} "
                         f"| {cells[0]} | {cells[1]} |")
        lines.append("")
        lines.append("Which candidates to measure, one energy measurement at a time among those in the slack "
                     "(the model retrained after each from the third on): measurements needed to find the least "
                     "energy in the slack (of how many the naive way measures: all of them), and how far above "
                     "it each rule still is after 30 % of those measurements (random: mean of "
                     f"{report['splits']} seeds).")
        lines.append("")
        labels = next((list(w["selection"]) for w in report["slack"] if w.get("selection")), [])
        lines.append("| workload | seed | " + " | ".join(labels) + " |")
        lines.append("|---|---|" + "---|" * len(labels))
        for w in report["slack"]:
            found = w.get("selection", {})
            cells = [f"{found[label]['measurements_to_least']:.0f}/{w['within_slack']}, "
                     f"+{100 * found[label]['excess_at_30_percent']:.1f} %" if label in found else "-"
                     for label in labels]
            lines.append(f"| {w['name']} | {w['seed']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"All figures above: backend **{report['backend']}**. Issue target (sim): energy MAPE < 10 % and "
                 "Spearman > 0.85 on 256 held-out after 64 training candidates.")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="*", default=list(DEFAULT_WORKLOADS),
                        help="suite names (kernels.SUITE_SPECS) or specs (none: only the slack study)")
    parser.add_argument("--backend", default="sim", choices=("sim", "nvml", "auto"))
    parser.add_argument("--gpu", default="h100")
    parser.add_argument("--train", type=int, default=64)
    parser.add_argument("--test", type=int, default=256)
    parser.add_argument("--spare", type=int, default=16, help="extra candidates sampled in case some fail")
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--ensemble", type=int, default=5)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-store", action="store_true", help="also try MetaSchedule per-store features")
    parser.add_argument("--out", type=Path, default=Path("out/energy_model_accuracy"))
    parser.add_argument("--pool-cache", type=Path, default=None,
                        help="keep measured pools (features + measurements) here and reuse them")
    parser.add_argument("--transfer", nargs=2, metavar=("SOURCE", "TARGET"),
                        help="also measure transfer of a model from one workload to another (e.g. two shapes)")
    parser.add_argument("--transfer-sizes", nargs="+", type=int, default=[4, 8, 16, 32, 64])
    parser.add_argument("--refeature", action="store_true",
                        help="with --pool-cache: recompute the features of cached pools from their traces")
    parser.add_argument("--slack-seeds", nargs="*", type=int, default=[],
                        help="sim only: also study the candidates within --slack of the fastest, from a latency-"
                             "tuning run per seed")
    parser.add_argument("--slack-workloads", nargs="+", default=None, help="default: --workloads")
    parser.add_argument("--slack", type=float, default=0.05)
    parser.add_argument("--slack-trials", type=int, default=96)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    report = {"benchmark": "energy_model_accuracy", "train": args.train, "test": args.test, "splits": args.splits,
              "ensemble": args.ensemble, "k": args.k, "seed": args.seed, "default_mode": DEFAULT_ENERGY_MODE,
              "workloads": []}
    pools = {}
    for name in list(args.workloads) + [n for n in (args.transfer or []) if n not in args.workloads]:
        cached = args.pool_cache / f"{_slug(name)}-{args.backend}-{args.seed}.json" \
            if args.pool_cache else None
        if cached is not None and cached.exists():
            pool = json.loads(cached.read_text())
            log(f"{name}: {len(pool['rows'])} measured candidates from {cached}")
            if args.refeature:
                refeature(pool, args)
        else:
            pool = measure_pool(name, args)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                cached.write_text(json.dumps(pool))
        pools[name] = pool
        report["backend"] = pool["device"]["backend"]
        report["device"] = pool["device"]["name"]
        if name not in args.workloads:
            continue
        results = evaluate(pool, args)
        report["workloads"].append({"name": name, "spec": pool["spec"], "family": pool["family"],
                                    "backend": pool["device"]["backend"], "measured": len(pool["rows"]),
                                    "energy_spread": pool["energy_spread"], "sample_s": pool["sample_s"],
                                    "measure_s": pool["measure_s"], "results": results,
                                    "top_features": importances(pool, args)})
        for label, s in results.items():
            log(f"[{pool['device']['backend']}] {name} {label:18s} MAPE {100 * s['mape']:5.1f} %  "
                f"Spearman {s['spearman']:.3f}  top-{args.k} {s['top_k_recall']:.2f}  regret@1 {100 * s['regret_at_1']:.1f} %")
    if args.slack_seeds:
        if args.backend != "sim":
            parser.error("--slack-seeds runs latency tuning on sim; it does not apply to other backends")
        report.update(slack_fraction=args.slack, slack_trials=args.slack_trials, slack=[])
        for name in args.slack_workloads or args.workloads:
            for seed in args.slack_seeds:
                pool = slack_pool(name, seed, args)
                report.setdefault("backend", "sim")
                report.setdefault("device", pool["device"])
                found = evaluate_in_slack(pool, args)
                report["slack"].append(found)
                log(f"[sim] {name} seed {seed}: {found['within_slack']} within {100 * args.slack:g} %, power "
                    f"{found['power_min_w']:.0f}-{found['power_max_w']:.0f} W (CV {100 * found['power_cv']:.1f} %), "
                    f"saving over the fastest {100 * found['saving_over_fastest']:.1f} %; "
                    + "; ".join(f"{label} MAPE {100 * r['mape']:.2f} % rho {r['spearman']:.2f}"
                                for label, r in found.get("results", {}).items()))
    if args.transfer:
        source, target = args.transfer
        report["transfer"] = {"source": source, "target": target, "backend": pools[target]["device"]["backend"],
                              "results": transfer(pools[source], pools[target], args)}
        for how, by_n in report["transfer"]["results"].items():
            for n, s in by_n.items():
                log(f"[{report['transfer']['backend']}] transfer {source} -> {target} {how:9s} n={n:>3s} "
                    f"MAPE {100 * s['mape']:5.1f} %  Spearman {s['spearman']:.3f}")
    (args.out / "energy_model_accuracy.json").write_text(json.dumps(report, indent=1))
    (args.out / "energy_model_accuracy.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
