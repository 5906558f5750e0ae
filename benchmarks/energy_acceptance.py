"""Issue 3's acceptance check of the energy protocol: etune's energy per call against one long window.

On an NVIDIA GPU, for a vendor reference (default torch.matmul fp16 4096^3): measure energy per call
``--repeats`` times with etune's protocol (``etune measure --vendor``'s code path: warm-up, >= 1 s
windows on counter steps until CV <= 1 %), then once with a single window of ``--long-window-s``
seconds (default 10 s) by the same code, and report

- the relative difference between the median of the repeats and the long window (target <= 3 %),
- the same against the long window's energy from sampled power (``nvmlDeviceGetPowerUsage``
  integrated over that window): a second reference that shares no code with the counter's,
- the coefficient of variation of the repeats (target <= 1 %),

The long window runs with ten times the launch batch (CUDA-graph replays of ~20 ms instead of ~2 ms),
so a wrong per-call divisor or idle gaps between launches would show up as a difference.

with every window's telemetry in the raw JSON. The GPU is measured as found: no clock, power-limit or
persistence changes.

    python benchmarks/energy_acceptance.py --out $OUT/acceptance
    python benchmarks/energy_acceptance.py --vendor softmax:4096,4096 --repeats 5
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from etune.measurements.backend import MeasureResult  # noqa: E402

MAX_DIFFERENCE = 0.03
MAX_CV = 0.01


def _row(result: MeasureResult) -> dict:
    return {"ok": result.ok, "energy_j": result.value, "error": result.error, "spread": result.spread,
            "sm_clock_mhz": result.sm_clock_mhz, "temperature_c": result.temperature_c,
            "details": result.details}


def acceptance(measure: Callable[[], MeasureResult], measure_long: Callable[[], MeasureResult],
               repeats: int) -> dict:
    """Run the repeats, then the long window, and judge them against issue 3's targets."""
    runs = [measure() for _ in range(repeats)]
    long = measure_long()
    failed = [r.error for r in [*runs, long] if not r.ok]
    document = {"repeats": [_row(r) for r in runs], "long_window": _row(long),
                "targets": {"max_difference": MAX_DIFFERENCE, "max_cv": MAX_CV}}
    if failed:
        return {**document, "passed": False, "error": failed[0]}
    values = [r.value for r in runs]
    median = statistics.median(values)
    cv = statistics.stdev(values) / statistics.fmean(values) if len(values) > 1 else 0.0
    difference = median / long.value - 1
    windows = long.details.get("windows")
    sampled = windows[0].get("sampled_joules_per_call") if isinstance(windows, list) and windows else None
    by_power = None if not sampled else median / sampled - 1
    meets_power = by_power is None or abs(by_power) <= MAX_DIFFERENCE
    return {
        **document,
        "median_energy_j": median,
        "long_window_energy_j": long.value,
        "long_window_sampled_power_energy_j": sampled,
        "difference": difference,
        "difference_sampled_power": by_power,
        "cv": cv,
        "meets_difference": abs(difference) <= MAX_DIFFERENCE,
        "meets_sampled_power": meets_power,
        "meets_cv": cv <= MAX_CV,
        "passed": abs(difference) <= MAX_DIFFERENCE and meets_power and cv <= MAX_CV,
    }


def markdown(document: dict) -> str:
    lines = [f"# Energy protocol acceptance: {document['vendor']} on {document['device']['name']}", "",
             f"{document['date']}, driver {document['device']['driver']}, command `{document['command']}`.", ""]
    if "error" in document:
        return "\n".join(lines + [f"Failed: {document['error']}", ""])
    long = document["long_window"]["details"]
    lines += ["| measurement | energy/call (mJ) | latency/call (us) | windows | CV |", "|---|---|---|---|---|"]
    for i, row in enumerate(document["repeats"], 1):
        d = row["details"]
        lines.append(f"| etune protocol #{i} | {row['energy_j'] * 1e3:.3f} | {d['latency_s'] * 1e6:.2f} | "
                     f"{len(d['windows'])} | {100 * (row['spread'] or 0):.2f} % |")
    lines.append(f"| one {document['long_window_s']:g} s window | {document['long_window_energy_j'] * 1e3:.3f} | "
                 f"{long['latency_s'] * 1e6:.2f} | {len(long['windows'])} | - |")
    lines += ["",
              f"- median of the repeats vs the long window: {100 * document['difference']:+.2f} % "
              f"(target within {100 * MAX_DIFFERENCE:g} %): {'met' if document['meets_difference'] else 'missed'}",
              *([f"- median of the repeats vs the long window's integrated sampled power: "
                 f"{100 * document['difference_sampled_power']:+.2f} %: "
                 f"{'met' if document['meets_sampled_power'] else 'missed'}"]
                if document.get("difference_sampled_power") is not None else []),
              f"- CV of the {len(document['repeats'])} repeats: {100 * document['cv']:.2f} % "
              f"(target <= {100 * MAX_CV:g} %): {'met' if document['meets_cv'] else 'missed'}", ""]
    return "\n".join(lines)


def long_window_settings(seconds: float = 10.0) -> dict:
    """NvmlBackend settings of the reference: one window of ``seconds``, ten times etune's launch
    batch, sampled power integrated beside the counter."""
    from etune.measurements.vendor import GRAPH_BATCH_S

    return {"min_window_s": seconds, "max_windows": 1, "target_cv": 1.0,
            "vendor_graph_batch_s": 10 * GRAPH_BATCH_S, "integrate_power": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vendor", default="gemm:4096,4096,4096", help="workload whose vendor kernel is measured")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--long-window-s", type=float, default=10.0)
    parser.add_argument("--device", type=int, default=0, help="NVML index")
    parser.add_argument("--out", type=Path, default=Path("out/energy_acceptance"))
    args = parser.parse_args()

    from etune.kernels import parse_spec
    from etune.measurements.backend import BackendError
    from etune.measurements.nvml_backend import NvmlBackend

    workload = parse_spec(args.vendor)
    try:
        protocol = NvmlBackend(args.device)
        # The same code with one window of the long length and no convergence loop.
        long_window = NvmlBackend(args.device, **long_window_settings(args.long_window_s))
    except BackendError as exc:
        raise SystemExit(f"energy_acceptance: {exc}") from None
    try:
        device = protocol.device()
        result = acceptance(lambda: protocol.measure_vendor(workload, "energy"),
                            lambda: long_window.measure_vendor(workload, "energy"), args.repeats)
    finally:
        protocol.close()
        long_window.close()
    document = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "vendor": args.vendor,
                "long_window_s": args.long_window_s, "device": dataclasses.asdict(device),
                "host": platform.node(), "command": " ".join(["python", *sys.argv]), **result}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "energy_acceptance.json").write_text(json.dumps(document, indent=2, default=str))
    (args.out / "energy_acceptance.md").write_text(markdown(document))
    print(markdown(document))
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
