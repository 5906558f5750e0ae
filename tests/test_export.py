"""Exports: best-candidate selection, the kernel library and its manifest, the MetaSchedule JSON
database, the library loader's checks, and the etune export / verify commands."""
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from etune.kernels import LibraryError, load_library
from etune.kernels.library import KernelLibrary, read_manifest
from etune.measurements.records import RecordsDB
from etune.tuner.export import (ExportError, export_library, export_ms_database, kernel_name,
                          load_ms_database, select_best)
from etune.tuner.export_cmd import export_command, verify_command

ROOT = Path(__file__).resolve().parents[1]

# Three candidates per workload: fastest, 2 % slower but less energy, 2x slower and least energy.
#   latency -> 0, energy@0.05 -> 1, energy@none -> 2, edp -> 2
FAKE = [(1.00e-5, 3e-3), (1.02e-5, 2e-3), (2.00e-5, 1e-3)]
SPECS = ("gemm:64,64,64", "softmax:64,64")


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("export")(export_command)
    app.command("verify")(verify_command)
    return app


runner = CliRunner()


def _one_line_error(result) -> str:
    assert result.exit_code != 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    return lines[0]


# -- a sim database of real candidates ---------------------------------------------------------------
@pytest.fixture(scope="module")
def sim_db(tmp_path_factory):
    """gemm:64,64,64 and softmax:64,64, three sampled candidates each with FAKE measurements on sim,
    plus noise that must be ignored: a failed measurement and a (fast) vendor reference."""
    from etune.search_space import ScheduleSpace

    path = tmp_path_factory.mktemp("exportdb") / "etune.db"
    chosen = {}
    with RecordsDB.open(path) as db:
        for spec in SPECS:
            space = ScheduleSpace(spec)
            candidates = space.sample(3, seed=1)
            assert len(candidates) == 3
            w = space.workload
            wid = db.add_workload(w.spec, w.family, w.params)
            db.start_run(wid, "energy@0.05", "sim", {"target": "sm_90"})
            hashes = []
            for c, (latency, energy) in zip(candidates, FAKE):
                cid = db.add_candidate(wid, c.structural_hash, c.design_space, c.trace_json())
                for kind, value in (("latency", latency), ("energy", energy)):
                    db.add_measurement(workload_id=wid, candidate_id=cid, kind=kind, backend="sim", value=value,
                                       device_name="sim:NVIDIA H100 80GB HBM3")
                hashes.append(c.structural_hash)
            db.add_measurement(workload_id=wid, candidate_id=cid, kind="latency", backend="sim", value=None,
                               ok=False, error="wrong output")
            db.add_measurement(workload_id=wid, kind="latency", backend="sim", value=1e-9,
                               details={"vendor": "torch"})
            chosen[spec] = hashes
    return path, chosen


@pytest.fixture(scope="module")
def exported(sim_db, tmp_path_factory):
    """`etune export --format both --objective energy@0.05` of the sim database, through the CLI."""
    path, chosen = sim_db
    out = tmp_path_factory.mktemp("export") / "lib"
    result = runner.invoke(_app(), ["export", "--db", str(path), "--objective", "energy@0.05", "--out", str(out),
                                    "--format", "both"])
    assert result.exit_code == 0, result.output
    return out, chosen, result.output


def test_cli_export_writes_library_manifest_sources_and_ms_database(exported):
    out, chosen, output = exported
    assert "simulated" in output
    for name in ("libetune_kernels.so", "manifest.json", "database_workload.json", "database_tuning_record.json"):
        assert (out / name).is_file(), name
    manifest = read_manifest(out)
    assert manifest["objective"] == "energy@0.05" and manifest["target"]["arch"] == "sm_90"
    assert manifest["tvm_version"] and manifest["etune_version"] and manifest["created"]
    assert manifest["simulated"] is True and any("simulated GPU" in n for n in manifest["notes"])
    import tvm

    assert manifest["runnable"] is tvm.runtime.enabled("cuda")
    assert [k["spec"] for k in manifest["kernels"]] == list(SPECS)
    for k in manifest["kernels"]:
        assert k["name"] == kernel_name(k["spec"])
        assert k["structural_hash"] == chosen[k["spec"]][1]  # energy@0.05: 2 % slower, less energy
        assert (k["latency_s"], k["energy_j"], k["energy_measured"]) == (FAKE[1][0], FAKE[1][1], True)
        assert k["simulated"] is True and "not from a measurement on hardware" in k["note"]
        assert k["measurements"]["backend"] == "sim"
        assert k["measurements"]["device_name"] == "sim:NVIDIA H100 80GB HBM3"
        assert k["tuning_runs"] == [{"objective": "energy@0.05", "backend": "sim", "status": "running",
                                     "arch": "sm_90"}]
        assert isinstance(k["trace"], list) and k["trace"]
        source = (out / k["source"]).read_text()
        assert f"{k['name']}_kernel(" in source and "__global__" in source
        if manifest["nvcc_checked"]:
            assert k["device_kernels"] and all(d["name"].startswith(k["name"] + "_kernel")
                                               for d in k["device_kernels"])
    assert [k["inputs"] for k in manifest["kernels"]] == [
        [{"name": "A", "shape": [64, 64], "dtype": "float16"}, {"name": "B", "shape": [64, 64], "dtype": "float16"}],
        [{"name": "X", "shape": [64, 64], "dtype": "float16"}],
    ]


def test_manifest_trace_rebuilds_the_exported_schedule(exported):
    from etune.tuner.export import _space

    out, _, _ = exported
    for k in read_manifest(out)["kernels"]:
        rebuilt = _space(k["spec"], _gpu()).from_trace_json(json.dumps(k["trace"]), k["design_space"])
        assert rebuilt.structural_hash == k["structural_hash"]


def _gpu():
    from etune.search_space import gpu_spec

    return gpu_spec("h100")


def test_best_under_each_objective(sim_db, tmp_path):
    path, chosen = sim_db
    path = Path(shutil.copy(path, tmp_path / "etune.db"))
    with RecordsDB.open(path) as db:  # runs of the other objectives (the fixture's is energy@0.05)
        for objective in ("latency", "energy@none", "edp"):
            for workload in db.workloads():
                db.finish_run(db.start_run(workload.id, objective, "sim", {}), "finished")
    for objective, index in (("latency", 0), ("energy@0.05", 1), ("energy@none", 2), ("edp", 2)):
        picks = {s.workload.spec: s.candidate.structural_hash for s in select_best(path, objective)}
        assert picks == {spec: hashes[index] for spec, hashes in chosen.items()}, objective
    only = select_best(path, "latency", workloads=["softmax:64, 64"])  # specs are normalised
    assert [s.workload.spec for s in only] == ["softmax:64,64"]


def test_ms_database_queries_the_chosen_schedules(exported, sim_db, tmp_path):
    from tvm.s_tir import meta_schedule as ms

    from etune.tuner.export import _space

    out, chosen, _ = exported
    gpu = _gpu()
    target = gpu.tvm_target()
    # The CLI export (objective energy@0.05): one record per workload, the energy choice.
    database = load_ms_database(out)
    for spec in SPECS:
        mod = _space(spec, gpu).mod
        schedule = database.query_schedule(mod, target, "main")
        assert _hash(schedule.mod) == chosen[spec][1]
    # Every measured candidate: TVM picks the fastest, and ranks all three by run_secs.
    summary = export_ms_database(sim_db[0], tmp_path)
    assert [w["records"] for w in summary["workloads"]] == [3, 3]
    database = ms.database.JSONDatabase(path_workload=summary["path_workload"],
                                        path_tuning_record=summary["path_tuning_record"], allow_missing=False)
    assert len(database) == 6
    for spec in SPECS:
        mod = _space(spec, gpu).mod
        record = database.query_tuning_record(mod, target, "main")
        assert [float(s) for s in record.run_secs] == [FAKE[0][0]]
        assert str(record.target.attrs["arch"]) == "sm_90"
        assert _hash(database.query_schedule(mod, target, "main").mod) == chosen[spec][0]
        assert _hash(database.query_ir_module(mod, target, "main")) == chosen[spec][0]
        top = database.get_top_k(database.commit_workload(mod), 3)
        assert [float(r.run_secs[0]) for r in top] == [f[0] for f in FAKE]
    # Exporting again into the same directory replaces the files (asked to) rather than appending to them.
    with pytest.raises(ExportError, match="holds an earlier etune export: add --force to replace it"):
        export_ms_database(sim_db[0], tmp_path, objective="energy@0.05")
    summary = export_ms_database(sim_db[0], tmp_path, objective="energy@0.05", force=True)
    assert [w["records"] for w in summary["workloads"]] == [1, 1]
    assert len(load_ms_database(tmp_path)) == 2


def _hash(mod) -> str:
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(mod) & 0xFFFFFFFFFFFFFFFF:016x}"


# -- selection on a fake database (no TVM) ------------------------------------------------------------------
def _fake_db(path, rows, objectives=("latency", "energy@0.05", "energy@none", "edp")):
    """rows: spec -> list of (hash, backend, latencies, energies); a finished run of each objective on
    each backend."""
    with RecordsDB.open(path) as db:
        for spec, candidates in rows.items():
            wid = db.add_workload(spec, spec.partition(":")[0], {})
            for objective in objectives:
                for backend in sorted({c[1] for c in candidates}):
                    db.finish_run(db.start_run(wid, objective, backend, {}), "finished")
            for h, backend, latencies, energies in candidates:
                cid = db.add_candidate(wid, h, 0, "[]")
                for kind, values in (("latency", latencies), ("energy", energies)):
                    for v in values:
                        db.add_measurement(workload_id=wid, candidate_id=cid, kind=kind, backend=backend, value=v)
    return path


def test_points_are_medians_and_leave_out_failures_vendor_rows_and_other_backends(tmp_path):
    path = _fake_db(tmp_path / "db", {"gemm:8,8,8": [
        ("a", "sim", [3e-6, 1e-6, 2e-6], [5e-4, 7e-4, 6e-4]),
        ("b", "sim", [4e-6], []),
        ("c", "nvml", [1e-7], [1e-7]),
    ]})
    with RecordsDB.open(path) as db:
        wid = db.workloads()[0].id
        db.add_measurement(workload_id=wid, candidate_id=2, kind="latency", backend="sim", value=None, ok=False)
        db.add_measurement(workload_id=wid, kind="latency", backend="sim", value=1e-9)  # vendor
        points = db.points(wid, "sim")
        # An energy measurement that hit its window cap unconverged marks the point.
        db.add_measurement(workload_id=wid, candidate_id=2, kind="energy", backend="sim", value=9e-4,
                           details={"converged": False})
        again = db.points(wid, "sim")
    assert [(p.key, p.latency_s, p.energy_j, p.energy_measured, p.energy_converged) for p in points] == [
        (1, 2e-6, 6e-4, True, True), (2, 4e-6, None, False, True)]
    assert [(p.key, p.energy_j, p.energy_converged) for p in again] == [(1, 6e-4, True), (2, 9e-4, False)]


def test_backend_choice(tmp_path):
    path = _fake_db(tmp_path / "db", {"gemm:8,8,8": [("a", "sim", [1e-6], [1e-3]), ("b", "nvml", [2e-6], [2e-3])]})
    assert select_best(path, "latency")[0].candidate.structural_hash == "b"  # hardware over the simulator
    assert select_best(path, "latency", backend="sim")[0].candidate.structural_hash == "a"
    with pytest.raises(ExportError, match="no ok latency measurement on backend 'rocm'"):
        select_best(path, "latency", backend="rocm")
    two = _fake_db(tmp_path / "db2", {"gemm:8,8,8": [("a", "nvml", [1e-6], []), ("b", "nvml2", [2e-6], [])]})
    with pytest.raises(ExportError, match="several backends.*--backend"):
        select_best(two, "latency")


def test_export_errors_are_one_readable_line(tmp_path):
    missing = tmp_path / "missing.db"
    with pytest.raises(ExportError, match="no records database"):
        export_library(missing, "latency", tmp_path / "out")
    assert not missing.exists()  # not created by the attempt
    empty = tmp_path / "empty.db"
    RecordsDB.open(empty).close()
    with pytest.raises(ExportError, match="has no workloads"):
        export_library(empty, "latency", tmp_path / "out")
    path = _fake_db(tmp_path / "db", {"gemm:8,8,8": [("a", "sim", [1e-6], [])], "softmax:8,8": []})
    with pytest.raises(ExportError, match="workload gemm:9,9,9 is not in .*; it has: gemm:8,8,8, softmax:8,8"):
        select_best(path, "latency", workloads=["gemm:9,9,9"])
    with pytest.raises(ExportError, match="cannot parse workload"):
        select_best(path, "latency", workloads=["gemm"])
    with pytest.raises(ExportError, match="softmax:8,8: no candidate has an ok latency measurement"):
        select_best(path, "latency")
    with pytest.raises(ExportError, match="no candidate has an ok energy measurement.*--objective latency"):
        select_best(path, "energy", workloads=["gemm:8,8,8"])
    with pytest.raises(ExportError, match="bad objective"):
        select_best(path, "fastest")
    # A run of the objective asked for, not another objective's winner.
    only = _fake_db(tmp_path / "only.db", {"gemm:8,8,8": [("a", "sim", [1e-6], [1e-3])]}, objectives=("latency",))
    with pytest.raises(ExportError, match=r"gemm:8,8,8 has no run tuned for energy@0.05 on sim \(tuned for: "
                                          r"latency\): tune it with --objective energy@0.05"):
        select_best(only, "energy")


def test_cli_user_mistakes_give_one_line(tmp_path, sim_db):
    app = _app()
    path = str(sim_db[0])
    cases = [
        (["export", "--db", str(tmp_path / "nope.db")], "no records database"),
        (["export", "--db", path, "--objective", "fastest"], "bad objective"),
        (["export", "--db", path, "--format", "onnx"], "unknown format"),
        (["export", "--db", path, "gemm:1,2,3"], "not in"),
        (["export", "--db", path, "--backend", "nvml"], "no ok latency measurement on backend 'nvml'"),
        (["export", "--db", path, "--target", "b9000"], "unknown GPU target"),
        (["verify", str(tmp_path)], "manifest.json is missing"),
        (["verify", str(tmp_path / "nothing")], "not a directory"),
    ]
    for args, message in cases:
        assert message in _one_line_error(runner.invoke(app, args)), args


def test_export_never_deletes_a_users_files_and_replaces_an_earlier_export_only_with_force(sim_db, tmp_path):
    app = _app()
    out = tmp_path / "out"

    def export(*extra):
        return runner.invoke(app, ["export", "--db", str(sim_db[0]), "--objective", "energy@0.05", "--out", str(out),
                                   "softmax:64,64", *extra])

    def snapshot():
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    # A folder of the user's: refused, with --force too, and nothing in it touched.
    (out / "kernels").mkdir(parents=True)
    (out / "kernels" / "mine.cu").write_text("// mine")
    (out / "manifest.json").write_text("{}")
    before = snapshot()
    for extra in ((), ("--force",)):
        line = _one_line_error(export(*extra))
        assert "holds files etune did not write (kernels/mine.cu and 1 more)" in line
        assert snapshot() == before
    # An empty folder is fine; the export lists what it wrote.
    shutil.rmtree(out)
    out.mkdir()
    assert export().exit_code == 0
    marker = json.loads((out / "etune-export.json").read_text())
    assert set(marker["files"]) == {"manifest.json", "libetune_kernels.so", "kernels/softmax_64_64.cu"}
    first = snapshot()
    # An earlier export: replaced only with --force, and a failed export leaves it as it was.
    assert "holds an earlier etune export: add --force" in _one_line_error(export())
    assert "no run tuned for latency" in _one_line_error(runner.invoke(app, [
        "export", "--db", str(sim_db[0]), "--objective", "latency", "--out", str(out), "--force"]))
    assert snapshot() == first
    assert export("--force").exit_code == 0
    assert json.loads((out / "manifest.json").read_text())["kernels"][0]["spec"] == "softmax:64,64"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind
    # A file of the user's in an earlier export: not replaced even with --force.
    (out / "notes.txt").write_text("mine")
    assert "holds files etune did not write (notes.txt)" in _one_line_error(export("--force"))
    assert (out / "notes.txt").read_text() == "mine"


def test_verify_without_a_runnable_library_or_gpu_is_one_line(exported):
    out, _, _ = exported
    import tvm

    if tvm.runtime.enabled("cuda") and tvm.cuda(0).exist:
        pytest.skip("a GPU is here: the GPU test verifies")
    line = _one_line_error(runner.invoke(_app(), ["verify", str(out)]))
    assert "GPU" in line


# -- the loader ------------------------------------------------------------------------------------
def _manifest(**changes) -> dict:
    manifest = {
        "format": "etune-kernel-library", "format_version": 1, "library": "libetune_kernels.so", "runnable": True,
        "simulated": True,
        "kernels": [
            {"name": "gemm_4_8_16", "spec": "gemm:4,8,16",
             "inputs": [{"name": "A", "shape": [4, 16], "dtype": "float16"},
                        {"name": "B", "shape": [16, 8], "dtype": "float16"}],
             "outputs": [{"name": "C", "shape": [4, 8], "dtype": "float16"}], "latency_s": 1e-6, "energy_j": None},
        ],
    }
    manifest.update(changes)
    return manifest


class FakeCudaTensor:
    """Just enough of a tensor: shape, dtype, __dlpack__ and a CUDA __dlpack_device__."""

    def __init__(self, shape, dtype="float16", device=(2, 0), contiguous=True):
        self.shape, self.dtype, self._device, self._contiguous = shape, dtype, device, contiguous

    def __dlpack__(self, **_):
        raise NotImplementedError

    def __dlpack_device__(self):
        return self._device

    def is_contiguous(self):
        return self._contiguous


def _library(calls):
    return KernelLibrary(_manifest(), {"gemm_4_8_16": lambda *args: calls.append(args)})


def test_kernels_by_name_spec_and_attribute():
    lib = _library([])
    kernel = lib["gemm_4_8_16"]
    assert lib["gemm:4,8,16"] is kernel and lib["gemm:4, 8, 16"] is kernel and lib.gemm_4_8_16 is kernel
    assert "gemm:4,8,16" in lib and len(lib) == 1 and list(lib) == [kernel] and lib.names == ["gemm_4_8_16"]
    assert kernel.signature == "gemm_4_8_16(A: float16[4, 16], B: float16[16, 8] -> C: float16[4, 8])"
    with pytest.raises(LibraryError, match="no kernel 'softmax:4,4' in this library; it has: gemm_4_8_16"):
        lib["softmax:4,4"]
    with pytest.raises(KeyError):
        lib["nope"]
    with pytest.raises(AttributeError):
        lib.nope


def test_arguments_are_checked_before_the_call():
    import tvm

    calls = []
    kernel = _library(calls).gemm_4_8_16
    a, b, c = FakeCudaTensor((4, 16)), FakeCudaTensor((16, 8)), FakeCudaTensor((4, 8))
    kernel(a, b, c)
    assert calls == [(a, b, c)]
    cases = [
        ((a, b), re.escape("takes 3 arguments (inputs A, B, then outputs C), got 2")),
        ((a, FakeCudaTensor((8, 16)), c), r"input B \(argument 2\): shape \(8, 16\) but the kernel was built for \(16, 8\)"),
        ((a, b, FakeCudaTensor((4, 8), "float32")), "output C .*dtype float32 but the kernel was built for float16"),
        ((np.zeros((4, 16), "float16"), b, c), "input A .*is on cpu:0; the kernel runs on a CUDA GPU"),
        ((a, b, np.zeros((4, 8), "float16")), "output C .*is on cpu:0"),
        ((a, FakeCudaTensor((16, 8), device=(2, 1)), c), "is on cuda:1 but the earlier arguments are on cuda:0"),
        ((a, b, FakeCudaTensor((4, 8), contiguous=False)), "not contiguous"),
        ((a, [[0.0] * 16] * 8, c), "expected a tensor .* got list"),
        ((FakeCudaTensor((4, 16), device=(10, 0)), b, c), "is on rocm:0"),
        ((tvm.runtime.tensor(np.zeros((4, 16), "float16")), b, c), "input A .*is on cpu:0"),
    ]
    for args, message in cases:
        with pytest.raises(LibraryError, match=message):
            kernel(*args)
    assert len(calls) == 1  # nothing reached the kernel


def test_run_needs_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        with pytest.raises(LibraryError, match="PyTorch, which is not installed"):
            _library([]).gemm_4_8_16.run(FakeCudaTensor((4, 16)), FakeCudaTensor((16, 8)))
    else:
        with pytest.raises(LibraryError, match="needs PyTorch inputs"):
            _library([]).gemm_4_8_16.run(FakeCudaTensor((4, 16)), FakeCudaTensor((16, 8)))


def test_manifest_errors(tmp_path):
    def write(document) -> Path:
        (tmp_path / "manifest.json").write_text(document if isinstance(document, str) else json.dumps(document))
        return tmp_path

    cases = [
        ("{not json", "not valid JSON"),
        ({"kernels": []}, "not an etune kernel library manifest"),
        (_manifest(format_version=99), "format version 99; this etune reads up to 1"),
        (_manifest(kernels=[]), "kernels must be a non-empty list"),
        (_manifest(runnable="yes"), "runnable must be true or false"),
    ]
    bad_shape = _manifest()
    bad_shape["kernels"][0]["inputs"][1]["shape"] = [16, -8]
    cases.append((bad_shape, r"kernels\[0\].inputs\[1\].shape must be a list of non-negative integers"))
    bad_name = _manifest()
    bad_name["kernels"][0]["name"] = "gemm:4,8,16"
    cases.append((bad_name, r"kernels\[0\].name must be an identifier"))
    # Every path in a manifest stays inside the library folder.
    for library in ("../../lib.so", "/etc/passwd", "kernels/../../lib.so", "..\\lib.so", "outside.so"):
        cases.append((_manifest(library=library), "library .* points outside the library folder"))
    bad_source = _manifest()
    bad_source["kernels"][0]["source"] = "../gemm.cu"
    cases.append((bad_source, r"kernels\[0\].source '../gemm.cu' points outside the library folder"))
    (tmp_path / "outside.so").symlink_to(tmp_path.parent / "elsewhere.so")
    for document, message in cases:
        with pytest.raises(LibraryError, match=message):
            read_manifest(write(document))
    write(_manifest(library="/etc/passwd"))
    assert "points outside the library folder" in _one_line_error(runner.invoke(_app(), ["verify", str(tmp_path)]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LibraryError, match="manifest.json is missing"):
        load_library(tmp_path / "empty")
    write(_manifest())
    with pytest.raises(LibraryError, match="libetune_kernels.so is missing"):
        load_library(tmp_path)
    write(_manifest(runnable=False))
    with pytest.raises(LibraryError, match="cannot run: .*Export it again .* on a GPU host"):
        load_library(tmp_path)


def test_a_cpu_export_refuses_to_load(exported):
    out, _, _ = exported
    if read_manifest(out)["runnable"]:
        pytest.skip("exported with a CUDA-enabled TVM")
    with pytest.raises(LibraryError, match="without a CUDA runtime"):
        load_library(out)


# -- on a GPU ------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_library_runs_in_a_fresh_process_and_matches_reference(sim_db, tmp_path):
    """Export for the local GPU, load in a fresh process, call with torch tensors (run() and
    destination-passing) and compare with the numpy reference; then etune verify."""
    path, chosen = sim_db
    manifest = export_library(path, "energy@0.05", tmp_path / "lib", gpu="local")
    assert manifest["runnable"] is True
    result = runner.invoke(_app(), ["verify", str(tmp_path / "lib")])
    assert result.exit_code == 0, result.output
    assert "2/2 kernels match" in result.output
    pytest.importorskip("torch")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import torch
        from etune.kernels import LibraryError, load_library, parse_spec
        lib = load_library({str(tmp_path / 'lib')!r})
        for i, kernel in enumerate(lib):
            workload = parse_spec(kernel.spec)
            inputs = workload.random_inputs(i)
            tensors = [torch.from_numpy(x).cuda() for x in inputs]
            out = kernel.run(*tensors)
            torch.cuda.synchronize()
            ok, err = workload.check([out.cpu().numpy()], workload.reference(inputs))
            assert ok, (kernel.spec, err)
            dest = torch.full(tuple(workload.outputs[0].shape), float("nan"), dtype=torch.float16, device="cuda")
            kernel(*tensors, dest)
            torch.cuda.synchronize()
            assert workload.check([dest.cpu().numpy()], workload.reference(inputs))[0]
            try:
                kernel(*[t.cpu() for t in tensors], dest)
                raise SystemExit("a CPU tensor was accepted")
            except LibraryError as exc:
                assert "CUDA" in str(exc)
        print("OK", len(lib))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "OK 2" in proc.stdout, proc.stdout + proc.stderr


def test_ms_database_carries_a_fused_attention_winner(tmp_path):
    """A schedule of a fused template is a record of that template's module, not of the TE chain."""
    from etune.measurements.records import RecordsDB
    from etune.search_space import ScheduleSpace
    from etune.tuner.search import tune

    spec = "attention:2,16,1,4096,64"  # long KV: the fused split-KV kernel wins by far on sim
    db = tmp_path / "decode.db"
    assert tune(spec, "latency", backend="sim", db=db, trials=8, build=False, seed=0).best is not None
    with RecordsDB.open(db) as records:
        rows = {r.structural_hash: r for r in records.candidates(records.workloads()[0].id)}
    summary = export_ms_database(db, tmp_path / "ms", objective="latency")
    (entry,) = summary["workloads"]
    winner = rows[entry["structural_hash"]]
    assert ScheduleSpace(spec).design_spaces[winner.design_space].rule_set == "fused"
    assert len(load_ms_database(tmp_path / "ms")) == 1
