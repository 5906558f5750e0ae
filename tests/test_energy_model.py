"""energy_model: features, the XGBoost cost models, the update policy, metrics, and accuracy on sim."""
import math

import numpy as np
import pytest

from etune.energy_model import metrics
from etune.energy_model.baselines import ConstantPowerModel
from etune.energy_model.features import (BUILD_FEATURES, FEATURE_NAMES, blocks_per_sm, candidate_features, launch_features,
                                   occupancy, to_matrix)
from etune.energy_model.model import CostModel, ModelError, efficiency_weights
from etune.energy_model.policy import UpdatePolicy
from etune.search_space import BuildResult, KernelResources, ScheduleSpace, gpu_spec

H100 = gpu_spec("h100")
SOFTMAX = "softmax:4096,4096"  # kernels.SUITE_SPECS["softmax-4096x4096"]


# -- fixtures: one schedule space per workload for the whole module (the first costs ~20 s) --------
@pytest.fixture(scope="module")
def softmax_candidates():
    # MetaSchedule's own softmax spaces, where these thresholds were set and power varies from schedule
    # to schedule. Among the row-softmax template's candidates (rule set rowsoftmax) the constant-power
    # baseline ranks the fastest quarter as well as the model (Spearman 0.98 against 0.95): power is
    # flat there, as it is within the slack on sim (docs/sim_results.md).
    space = ScheduleSpace(SOFTMAX, H100, rule_sets=["tensorcore", "simt"])
    candidates = space.sample(64 + 96, seed=11)
    assert len(candidates) == 160
    return candidates


@pytest.fixture(scope="module")
def gemm_candidates():
    return ScheduleSpace("gemm:256,256,256", H100).sample(6, seed=5)


def synthetic(n, seed, noise=0.02):
    """Features a..d uniform in [0, 1]; y = exp(f(x)) with structure everywhere, big swings at high y."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 1, size=(n, 4))
    f = 1.5 * X[:, 0] + (X[:, 0] > 0.4) * np.sin(9 * X[:, 1]) + 0.3 * np.sin(9 * X[:, 2]) + 0.3 * np.sin(9 * X[:, 3])
    y = np.exp(f) * 1e-3
    return [dict(zip("abcd", row)) for row in X], y * np.exp(rng.normal(0, noise, n)), y


# -- features --------------------------------------------------------------------------------------
def test_features_are_finite_and_vary(softmax_candidates, gemm_candidates):
    candidates = softmax_candidates[:40] + gemm_candidates
    rows = [candidate_features(c, H100) for c in candidates]
    assert all(list(r) == list(FEATURE_NAMES) for r in rows)
    X = to_matrix(rows)
    assert X.shape == (len(candidates), len(FEATURE_NAMES))
    build_cols = [FEATURE_NAMES.index(n) for n in BUILD_FEATURES]
    other = [j for j in range(len(FEATURE_NAMES)) if j not in build_cols]
    assert np.isfinite(X[:, other]).all()
    assert np.isnan(X[:, build_cols]).all()  # no build given
    varying = [FEATURE_NAMES[j] for j in other if np.unique(X[:40, j]).size > 1]
    for name in ("n_kernels", "global_bytes_log2", "threads_per_block", "waves", "est_time_s", "unroll_max_step"):
        assert name in varying, name
    assert len(varying) >= 20
    for c, r in zip(candidates, rows):
        assert r["n_kernels"] == len(c.launches)
        assert r["workload_flops_log2"] == pytest.approx(math.log2(1 + c.workload.flops))
        assert 0 < r["occupancy"] <= 1 and 0 < r["wave_efficiency"] <= 1
        assert r["est_time_s"] >= r["roofline_s"] > 0
        # Power features: the share of SM-time holding blocks, and whole 32-byte sectors moved.
        assert 0 < r["busy_thread_fraction"] <= r["busy_sm_fraction"] <= r["sm_fill"] <= 1
        assert r["l2_sector_bytes_log2"] >= r["global_bytes_log2"]
    gemm_rows = rows[40:]
    assert any(r["tensor_core_fraction"] > 0.5 for r in gemm_rows)  # tensor-core schedules are sampled
    assert all(r["family_gemm"] == 1 for r in gemm_rows) and all(r["family_softmax"] == 1 for r in rows[:40])


def test_multi_kernel_aggregation(softmax_candidates):
    multi = next(c for c in softmax_candidates if len(c.launches) >= 3)
    f = candidate_features(multi, H100)
    threads = [k.threads_per_block for k in multi.launches]
    assert min(threads) <= f["threads_per_block"] <= max(threads) == f["max_threads_per_block"]
    total_load = sum(k.traffic.global_load_bytes for k in multi.launches)
    assert f["global_load_bytes_log2"] == pytest.approx(math.log2(1 + total_load))


def test_registers_and_spills_from_build(softmax_candidates):
    c = softmax_candidates[0]
    kernels = [KernelResources(k.name, registers=40 + 8 * i, shared_bytes=k.shared_bytes, stack_bytes=16,
                               spill_store_bytes=8, spill_load_bytes=8) for i, k in enumerate(c.launches)]
    build = BuildResult(c.structural_hash, "ok", 1.0, kernels=kernels)
    f = candidate_features(c, H100, build=build)
    registers = [k.registers for k in kernels]
    assert f["max_registers_per_thread"] == max(registers)
    assert min(registers) <= f["registers_per_thread"] <= max(registers)
    assert 0 < f["occupancy_with_registers"] <= f["occupancy"]
    assert f["spill_bytes_log2"] == pytest.approx(math.log2(1 + 16 * len(kernels)))
    assert f["stack_bytes_per_thread"] == 16
    failed = BuildResult(c.structural_hash, "error", 1.0, error="nvcc: boom", kernels=kernels)
    assert math.isnan(candidate_features(c, H100, build=failed)["registers_per_thread"])


def test_spill_and_tensor_instruction_features_without_a_build():
    """Without ptxas' figures, the static estimate: a 1024-thread block whose 512 B of local arrays
    cannot fit (64 registers each) spills in proportion to its local accesses; HMMA instructions are
    the lowered code's count, not flops / 256."""
    from etune.kernels import as_workload
    from etune.search_space.analysis import KernelLaunch, Traffic

    workload = as_workload("gemm:1024,1024,1024")

    def kernel(local, **traffic):
        return KernelLaunch("k", (132, 1, 1), (1024, 1, 1), 0, local, True, 1, traffic=Traffic(**traffic))

    work = dict(tensor_core_flops=132 * 1024 * 6400.0, local_access_bytes=132 * 1024 * 4096.0,
                global_load_bytes=1e6, global_load_instructions=1e5)
    fits, spills = (launch_features([kernel(local, **work)], workload, H100) for local in (64, 512))
    assert fits["est_spill_access_bytes_log2"] == 0 and spills["est_spill_access_bytes_log2"] > 20
    # m16n8k8: 100 HMMA per thread for those flops, where flops / (2 * 16^3 / 32) would say 25
    m16n8k8 = launch_features([kernel(64, tensor_core_instructions=132 * 1024 * 100.0, **work)], workload, H100)
    assert m16n8k8["issued_instructions_log2"] > fits["issued_instructions_log2"]


def test_occupancy_calculator():
    assert blocks_per_sm(256, 0, H100) == 8 and occupancy(256, 0, H100) == 1.0
    assert blocks_per_sm(256, 0, H100, registers=64) == 4 and occupancy(256, 0, H100, registers=64) == 0.5
    assert blocks_per_sm(128, 48 * 1024, H100) == 4  # 228 KiB / (48 + 1) KiB
    assert blocks_per_sm(32, 0, H100) == 32  # the block limit


def test_rate_and_relative_features(softmax_candidates):
    from etune.energy_model.features import RATE_FEATURES, rate_features, relative_features

    f = candidate_features(softmax_candidates[0], H100)
    rates = rate_features(f, 1e-4)
    assert list(rates) == list(RATE_FEATURES) and all(math.isfinite(v) for v in rates.values())
    assert rate_features(f, 2e-4)["achieved_bandwidth_fraction"] == pytest.approx(
        rates["achieved_bandwidth_fraction"] / 2, rel=1e-6)
    assert all(math.isnan(v) for v in rate_features(f, float("nan")).values())
    rel = relative_features({**f, **rates})
    assert rel["workload_flops_log2"] == f["workload_flops_log2"]
    assert rel["roofline_s"] == pytest.approx(f["roofline_s"] / f["workload_roofline_s"])
    assert rel["global_bytes_log2"] == pytest.approx(f["global_bytes_log2"] - f["workload_min_bytes_log2"])


# -- the model -------------------------------------------------------------------------------------
def test_save_load_round_trip_and_warm_start(tmp_path):
    features, y, _ = synthetic(96, seed=1)
    latency = list(np.asarray(y) / 300.0 * np.exp(np.linspace(-0.2, 0.2, len(y))))
    for model in (CostModel("latency", ensemble=3, seed=3, n_estimators=80),
                  CostModel("latency", ensemble=2, seed=3, n_estimators=40, baseline="bottleneck", relative=False),
                  CostModel("energy", mode="energy", ensemble=3, seed=3, n_estimators=80),
                  CostModel("energy", mode="power", ensemble=3, seed=3, n_estimators=80)):
        model.fit(features, y, latency_s=latency)
        path = model.save(tmp_path / f"{model.target}-{model.mode}-{model.baseline}.json")
        assert "pickle" not in path.read_text()[:200]
        back = CostModel.load(path)
        mean, std = model.predict(features[:20], latency_s=latency[:20])
        mean2, std2 = back.predict(features[:20], latency_s=latency[:20])
        np.testing.assert_array_equal(mean, mean2)
        np.testing.assert_array_equal(std, std2)
        assert (std > 0).any() and back.trained and len(back.data.y) == len(y)
        if model.mode == "power":  # without a measured latency, the latency model steps in
            no_latency, _ = back.predict(features[:20])
            assert np.isfinite(no_latency).all()
            np.testing.assert_array_equal(no_latency, model.predict(features[:20])[0])

    # A model loaded from another "shape" (here: targets off by 30 %) learns the new data by boosting on.
    new_features, new_y, new_true = synthetic(96, seed=2)
    new_y = new_y * 1.3
    old = CostModel.load(tmp_path / "latency-latency-workload.json")
    before = metrics.mape(old.predict(new_features)[0], new_true * 1.3)
    old.fit(new_features[:64], new_y[:64], warm_start=True)
    after = metrics.mape(old.predict(new_features[64:])[0], new_true[64:] * 1.3)
    assert after < before
    assert len(old.data.y) == 96 + 64
    refit = CostModel.load(tmp_path / "latency-latency-workload.json").update(new_features[:64], new_y[:64], how="refit")
    assert len(refit.data.y) == 96 + 64


def test_model_input_checks():
    features, y, _ = synthetic(10, seed=0)
    with pytest.raises(ValueError):
        CostModel("energy", mode="power").fit(features, y)  # power needs latency
    with pytest.raises(ValueError):
        CostModel("latency", mode="power")
    with pytest.raises(ModelError):
        CostModel("latency").predict(features)
    # Bad targets are dropped, not trained on.
    y_bad = list(y)
    y_bad[0], y_bad[1] = float("nan"), -1.0
    model = CostModel("latency", ensemble=2, n_estimators=10).fit(features, y_bad)
    assert len(model.data.y) == 8


def test_efficiency_weights():
    w = efficiency_weights([1.0, 2.0, 4.0], floor=0.2)
    assert w.mean() == pytest.approx(1.0)
    assert w[0] > w[1] > w[2] > 0


def test_weighted_loss_is_more_accurate_on_the_low_end():
    """With limited capacity the weighted loss spends it on the efficient (low-y) region."""
    low_errors = {True: [], False: []}
    for seed in range(2):
        features, y, _ = synthetic(128, seed=10 + seed)
        test_features, _, truth = synthetic(2000, seed=100 + seed)
        low = truth <= np.quantile(truth, 0.1)
        for weighted in (True, False):
            model = CostModel("latency", ensemble=1, seed=0, weighted=weighted, weight_floor=0.05,
                              n_estimators=60, max_depth=2).fit(features, y)
            pred, _ = model.predict(test_features)
            low_errors[weighted].append(metrics.mape(pred[low], truth[low]))
    assert np.mean(low_errors[True]) < 0.85 * np.mean(low_errors[False])


# -- the update policy -----------------------------------------------------------------------------
def test_policy_picks_best_predicted_and_most_uncertain():
    mean = [5.0, 1.0, 3.0, 2.0, 4.0]
    std = [0.1, 0.01, 0.3, 0.02, 2.0]  # relative: 0.02, 0.01, 0.1, 0.01, 0.5
    policy = UpdatePolicy(per_batch=2, extra_checks=0)
    picked = policy.select(mean, std, latency_s=[1e-3] * 5)
    assert picked == [1, 4]
    assert policy.last.reasons == {1: "best predicted", 4: "most uncertain"}
    assert UpdatePolicy(per_batch=2).select(mean, std) == picked  # deterministic
    # Already measured candidates are never picked again.
    assert 1 not in UpdatePolicy(per_batch=2).select(mean, std, exclude=[1])


def test_policy_objective_with_slack_and_callable():
    mean = [1.0, 2.0, 3.0]
    latency = [2.0, 0.8, 1.02]  # the lowest energy is far slower than the fastest
    assert UpdatePolicy(per_batch=1, slack=0.05).select(mean, [0, 0, 0], latency_s=latency) == [1]
    assert UpdatePolicy(per_batch=1).select(mean, [0, 0, 0], latency_s=latency) == [0]
    edp = UpdatePolicy(per_batch=1).select(mean, [0, 0, 0], latency_s=latency, score=lambda lat, e: lat * e)
    assert edp == [1]  # energy x latency: 2.0, 1.6, 3.06
    # No model yet: the fastest first, then spread over the latency ranking.
    no_model = UpdatePolicy(per_batch=3, extra_checks=0).select(None, None, latency_s=[3.0, 1.0, 2.0, 4.0, 5.0])
    assert no_model[0] == 1 and len(no_model) == 3


def test_policy_budgets():
    mean = list(np.linspace(1, 2, 20))
    std = [0.1] * 20
    policy = UpdatePolicy(per_batch=4, global_budget=6, extra_checks=0)
    assert len(policy.select(mean, std, budget=2)) == 2
    assert len(policy.select(mean, std)) == 4
    assert len(policy.select(mean, std)) == 0  # global budget spent
    assert policy.spent == 6 and policy.remaining == 0
    assert UpdatePolicy(per_batch=4).select(mean[:2], std[:2]) == [0, 1]  # fewer candidates than quota


def test_policy_backs_off_when_accurate_and_measures_more_when_errors_grow():
    rng = np.random.default_rng(0)
    mean = list(np.linspace(1, 2, 30))
    std = list(rng.uniform(0.01, 0.1, 30))
    policy = UpdatePolicy(per_batch=8, min_per_batch=1, mape_threshold=0.1, min_observations=6, extra_checks=2)
    sizes = []
    for batch in range(8):
        picked = policy.select(mean, std)
        sizes.append(len(picked))
        policy.observe([1.0] * len(picked), [1.02] * len(picked))  # 2 % error: accurate
    assert sizes[0] == 8 and sizes[-1] == 1 and min(sizes) >= 1
    assert sizes == sorted(sizes, reverse=True)
    assert policy.state == "accurate" and policy.needs_retrain
    policy.mark_retrained()
    assert not policy.needs_retrain
    # The model goes wrong: 40 % errors. The next batch measures the full quota plus error checks.
    policy.observe([1.0], [1.4])
    picked = policy.select(mean, std)
    assert policy.last.state == "alarm" and len(picked) == 8 + 2
    assert "error check" in policy.last.reasons.values()
    # Errors that grow sharply but stay under the threshold also raise the alarm.
    calm = UpdatePolicy(per_batch=4, mape_threshold=0.2, min_observations=4)
    for _ in range(3):
        calm.observe(np.ones(4), np.full(4, 1.01))
        calm.select(mean, std)
    calm.observe(np.ones(2), np.full(2, 1.15))
    assert calm.state == "alarm"


# -- metrics ---------------------------------------------------------------------------------------
def test_metrics():
    true = np.array([1.0, 2.0, 3.0, 4.0])
    assert metrics.mape(true * 1.1, true) == pytest.approx(0.1)
    assert metrics.spearman([1, 2, 3, 4], true) == pytest.approx(1.0)
    assert metrics.spearman([4, 3, 2, 1], true) == pytest.approx(-1.0)
    assert metrics.top_k_recall([1, 2, 3, 4], true, 2) == 1.0
    assert metrics.top_k_recall([4, 3, 2, 1], true, 2) == 0.0
    assert metrics.top_k_recall([1, 3, 2, 4], true, 2) == 0.5
    assert metrics.best_regret([2, 1, 3, 4], true) == pytest.approx(1.0)
    s = metrics.summary([1.1, 2.0, 3.0, 4.0], true, k=2)
    assert s["n"] == 4 and s["top_k_recall"] == 1.0


# -- accuracy on the simulated GPU -----------------------------------------------------------------
@pytest.fixture(scope="module")
def sim_measured(softmax_candidates):
    from etune.measurements.sim import SimBackend

    backend = SimBackend(gpu="h100", seed=0)
    latency = backend.measure(softmax_candidates, "latency")
    energy = backend.measure(softmax_candidates, "energy")
    rows = [(candidate_features(c, H100), lat.value, en.value)
            for c, lat, en in zip(softmax_candidates, latency, energy) if lat.ok and en.ok]
    assert len(rows) >= 150
    return rows


def accuracy(model, train, test):
    """(MAPE, Spearman) of ``model`` trained on ``train`` on all of ``test`` and on its fastest quarter
    (where an energy objective with a latency slack chooses), and the predicted std."""
    model.fit([r[0] for r in train], [r[2] for r in train], latency_s=[r[1] for r in train])
    truth = np.array([r[2] for r in test])
    pred, std = model.predict([r[0] for r in test], latency_s=[r[1] for r in test])
    fast = np.array([r[1] for r in test]) <= np.quantile([r[1] for r in test], 0.25)
    return {"all": (metrics.mape(pred, truth), metrics.spearman(pred, truth)),
            "fastest quarter": (metrics.mape(pred[fast], truth[fast]), metrics.spearman(pred[fast], truth[fast])),
            "std": std}


def beats_constant_power(scores, baseline) -> bool:
    """The bar an energy model must clear, on all held-out candidates and on the fastest quarter: at
    most a third of the constant-power baseline's MAPE and a higher Spearman, and absolute limits
    (MAPE < 10 %, Spearman > 0.9 over all) that the baseline misses on sim (21 % and 0.82)."""
    mape_all, rho_all = scores["all"]
    return mape_all < 0.10 and rho_all > 0.9 and all(
        scores[part][0] <= baseline[part][0] / 3 and scores[part][1] > baseline[part][1]
        for part in ("all", "fastest quarter"))


@pytest.fixture(scope="module")
def constant_power_scores(sim_measured):
    return accuracy(ConstantPowerModel(), sim_measured[:64], sim_measured[64:])


@pytest.mark.parametrize("mode", ["energy", "power", "constant"])
def test_energy_model_accuracy_on_sim(sim_measured, constant_power_scores, mode):
    """The model clears the bar; the constant-power stub in its place (median training power x
    measured latency, issue 14) does not: with absolute limits alone (25 %, 0.6) it passed."""
    model = ConstantPowerModel() if mode == "constant" else CostModel("energy", mode=mode, seed=0)
    scores = accuracy(model, sim_measured[:64], sim_measured[64:])
    print(mode, {k: v for k, v in scores.items() if k != "std"}, "constant:",
          {k: v for k, v in constant_power_scores.items() if k != "std"})
    assert beats_constant_power(scores, constant_power_scores) == (mode != "constant")
    assert (scores["std"] >= 0).all() and (scores["std"] > 0).any()


def test_latency_model_accuracy_on_sim(sim_measured):
    train, test = sim_measured[:64], sim_measured[64:]
    model = CostModel("latency", seed=0).fit([r[0] for r in train], [r[1] for r in train])
    truth = np.array([r[1] for r in test])
    pred, _ = model.predict([r[0] for r in test])
    assert metrics.mape(pred, truth) < 0.3
    assert metrics.spearman(pred, truth) > 0.6
