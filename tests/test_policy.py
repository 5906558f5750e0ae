"""The selection policies beside UpdatePolicy (expected improvement, the naive and random baselines)
and the constant-power stand-in for the energy model. Fast: no sim, no XGBoost."""
import math

import numpy as np
import pytest

from etune.energy_model.baselines import ConstantPowerModel
from etune.energy_model.model import ModelError
from etune.energy_model.policy import (ExpectedImprovementPolicy, FastestFirstPolicy, RandomPolicy,
                                       UpdatePolicy)

POLICIES = (ExpectedImprovementPolicy, FastestFirstPolicy, RandomPolicy, UpdatePolicy)


# -- expected improvement --------------------------------------------------------------------------
def test_ei_prefers_an_uncertain_near_miss_to_a_certain_loser():
    # Incumbent 1.0 mJ measured. Candidate 0: predicted 5 % worse but 10 % uncertain; 1: surely 50 % worse.
    policy = ExpectedImprovementPolicy()
    gain = policy.expected_improvement([1.05, 1.5], [0.105, 0.0], [1e-5, 1e-5], incumbent=1.0)
    assert gain[0] > 0 and gain[1] == 0
    assert policy.select([1.05, 1.5], [0.105, 0.0], latency_s=[1e-5, 1e-5], incumbent=1.0, budget=2) == [0]


def test_ei_ranks_sure_gains_uncertainty_and_ties_deterministically():
    mean = [0.9, 1.0, 1.0, 1.2, 1.0]
    std = [0.0, 0.4, 0.05, 0.0, 0.05]
    latency = [1.0] * 5
    policy = ExpectedImprovementPolicy()
    gain = policy.expected_improvement(mean, std, latency, incumbent=1.0)
    assert gain[0] == pytest.approx(0.1)  # certain: the improvement itself
    assert gain[1] > gain[2] == gain[4] > 0 == gain[3]  # at the incumbent, more spread promises more
    assert gain[2] == pytest.approx(0.05 * math.sqrt(1 / (2 * math.pi)), rel=0.05)  # ~ sigma * phi(0) * mean
    picks = ExpectedImprovementPolicy().select(mean, std, latency_s=latency, incumbent=1.0)
    assert picks == [1, 0, 2, 4]  # equal gains: the lower index first; the sure loser never
    assert ExpectedImprovementPolicy().select(mean, std, latency_s=latency, incumbent=1.0) == picks
    assert ExpectedImprovementPolicy().select(mean, std, latency_s=latency, incumbent=1.0, budget=2) == [1, 0]
    assert 1 not in ExpectedImprovementPolicy().select(mean, std, latency_s=latency, incumbent=1.0, exclude=[1])


def test_ei_matches_a_monte_carlo_estimate():
    rng = np.random.default_rng(0)
    mean, sigma, incumbent = 1.1, 0.2, 1.0
    draws = mean * np.exp(rng.normal(0, sigma, 400_000))
    expected = np.maximum(0, incumbent - draws).mean()
    gain = ExpectedImprovementPolicy().expected_improvement([mean], [sigma * mean], [1.0], incumbent=incumbent)
    assert gain[0] == pytest.approx(expected, rel=0.02)


def test_ei_stays_within_the_slack_and_uses_the_objective():
    # The lowest energy is 2x slower than the fastest: outside a 5 % slack, it is never measured.
    mean, std, latency = [0.5, 1.0], [0.1, 0.1], [2.0, 1.0]
    assert ExpectedImprovementPolicy(slack=0.05).select(mean, std, latency_s=latency, incumbent=1.2) == [1]
    # An affine objective (energy x latency): the same energies, the faster one gains more.
    edp = ExpectedImprovementPolicy().select([1.0, 1.0], [0.1, 0.1], latency_s=[2.0, 1.0], incumbent=1.2,
                                             score=lambda lat, energy: lat * energy)
    assert edp[0] == 1  # the slower one needs 40 % less energy than predicted: a 5-sigma long shot
    # The tuner's objective with a slack ranks a slow point after all others: no gain there.
    tuner_like = lambda lat, energy: energy if lat <= 1.05 else 1e6 * (1 + lat / 1.05) + energy  # noqa: E731
    assert ExpectedImprovementPolicy().select(mean, std, latency_s=latency, incumbent=1.2, score=tuner_like) == [1]


def test_ei_without_incumbent_model_or_spread():
    # Nothing measured yet: the best prediction is the reference, and is measured if nothing promises more.
    assert ExpectedImprovementPolicy().select([1.2, 1.0, 1.1], [0, 0, 0], latency_s=[1, 1, 1]) == [1]
    # Everything surely worse than the incumbent: nothing is worth a measurement.
    assert ExpectedImprovementPolicy().select([1.2, 1.1], [0, 0], latency_s=[1, 1], incumbent=1.0) == []
    # No model yet: the fastest first.
    assert ExpectedImprovementPolicy().select(None, None, latency_s=[3.0, 1.0, 2.0], budget=2) == [1, 2]
    # NaN predictions are never picked and break nothing.
    assert ExpectedImprovementPolicy().select([math.nan, 1.0], [0.1, 0.1], latency_s=[1, 1], incumbent=1.05) == [1]


def test_ei_widens_an_overconfident_ensemble_by_its_observed_error():
    policy = ExpectedImprovementPolicy(min_observations=4)
    narrow = policy.expected_improvement([1.1], [0.001], [1.0], incumbent=1.0)
    policy.observe([1.0] * 4, [1.25] * 4)  # the model has been 20 % off
    assert policy.sigma_floor == pytest.approx(0.2 * math.sqrt(math.pi / 2))
    assert policy.expected_improvement([1.1], [0.001], [1.0], incumbent=1.0)[0] > 100 * max(narrow[0], 1e-12)


# -- the baselines ---------------------------------------------------------------------------------
def test_fastest_first_takes_the_k_fastest_within_the_slack():
    latency = [1.0, 1.04, 0.99, 1.2, 1.03]
    assert FastestFirstPolicy(slack=0.05).select(None, latency_s=latency) == [2, 0, 4]  # 1.04 > 1.05 x 0.99
    assert FastestFirstPolicy(slack=0.05).select([5.0] * 5, [0.0] * 5, latency_s=latency, budget=2) == [2, 0]
    assert FastestFirstPolicy(slack=0.05).select(None, latency_s=latency, fastest_s=0.9) == []  # all too slow


def test_random_choice_is_seeded_and_stays_within_the_slack():
    latency = list(np.linspace(1.0, 1.1, 40))
    picks = [RandomPolicy(slack=0.05, seed=s).select(None, latency_s=latency, budget=5) for s in range(4)]
    assert all(len(p) == 5 and len(set(p)) == 5 and all(latency[i] <= 1.05 for i in p) for p in picks)
    assert RandomPolicy(slack=0.05, seed=0).select(None, latency_s=latency, budget=5) == picks[0]
    assert len({tuple(p) for p in picks}) > 1


@pytest.mark.parametrize("policy_class", POLICIES)
def test_every_policy_has_the_tuners_interface(policy_class):
    policy = policy_class(global_budget=3)
    mean, std, latency = [1.0, 1.1, 0.9, 1.2], [0.1] * 4, [1.0, 1.01, 1.02, 1.03]
    picked = policy.select(predicted_mean=mean, predicted_std=std, latency_s=latency,
                           score=lambda lat, energy: energy, fastest_s=1.0, budget=2, exclude=[2], incumbent=1.05)
    assert 0 < len(picked) <= 2 and 2 not in picked
    policy.observe([mean[i] for i in picked], [1.0] * len(picked))
    assert policy.spent == len(picked) and policy.remaining == 3 - len(picked)
    policy.select(mean, std, latency_s=latency, budget=5)
    assert policy.remaining == 0 and policy.select(mean, std, latency_s=latency) == []
    assert policy.to_json()["policy"] == policy_class.__name__


# -- the constant-power model ----------------------------------------------------------------------
def test_constant_power_model():
    latency = [1e-3, 2e-3, 1e-3, 4e-3]
    energy = [0.3, 0.4, 0.25, 1.6]  # 300, 200, 250, 400 W: median 275 W
    model = ConstantPowerModel(seed=1)
    assert not model.trained
    with pytest.raises(ModelError):
        model.predict([{}], latency_s=[1e-3])
    with pytest.raises(ValueError):
        model.fit([{}] * 4, energy)  # needs the latency
    model.fit([{}] * 4, energy, latency_s=latency)
    assert model.trained and model.power_w == pytest.approx(275.0)
    mean, std = model.predict([{}] * 2, latency_s=[1e-3, 3e-3])
    np.testing.assert_allclose(mean, [0.275, 0.825])
    assert (std > 0).all() and std[1] == pytest.approx(3 * std[0])
    np.testing.assert_array_equal(ConstantPowerModel(seed=1).fit([{}] * 4, energy, latency_s=latency)
                                  .predict([{}], latency_s=[1e-3])[1], std[:1])
    with pytest.raises(ModelError):
        model.predict([{}], latency_s=None)
    # Bad samples are dropped, like CostModel does.
    assert ConstantPowerModel().fit([{}] * 3, [0.3, math.nan, -1.0], latency_s=[1e-3] * 3).power_w == pytest.approx(300)


def test_update_policy_without_a_model_skips_measured_candidates():
    # It used to spread over a ranking that still held the excluded ones, and came back empty.
    latency = [1.0, 1.01, 1.02, 1.03]
    assert UpdatePolicy(per_batch=1, extra_checks=0).select(None, None, latency_s=latency, exclude=[0]) == [1]
    assert len(UpdatePolicy(per_batch=3, extra_checks=0).select(None, None, latency_s=latency, exclude=[0, 1])) == 2
