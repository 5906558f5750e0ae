"""Objectives pick the right point, and never a model's guess for an energy objective."""
import math

import pytest

from etune.tuner.objectives import Objective, ObjectiveError, Point, best, pareto_front

POINTS = [
    Point("fast", 100e-6, 50e-3, True),
    Point("near", 104e-6, 40e-3, True),  # 4 % slower, 20 % less energy
    Point("slow", 130e-6, 20e-3, True),  # least energy but 30 % slower
    Point("guess", 101e-6, None, False),  # energy never measured
]


def test_energy_with_slack_takes_least_energy_within_the_bound():
    assert best(POINTS, Objective("energy", 0.05)).key == "near"
    assert best(POINTS, Objective("energy", 0.35)).key == "slow"
    assert best(POINTS, Objective("energy", 0.0)).key == "fast"


def test_latency_and_unconstrained_energy_and_edp():
    assert best(POINTS, Objective("latency")).key == "fast"
    assert best(POINTS, Objective("energy")).key == "slow"
    # edp: fast 5.0e-6, near 4.16e-6, slow 2.6e-6
    assert best(POINTS, Objective("edp")).key == "slow"


def test_energy_objectives_ignore_unmeasured_energy():
    only_guess = [Point("guess", 1e-6, None, False)]
    assert best(only_guess, Objective("energy", 0.05)) is None
    assert best(only_guess, Objective("latency")).key == "guess"
    assert best([], Objective("latency")) is None


def test_an_unconverged_energy_wins_only_when_allowed():
    points = [Point("steady", 100e-6, 50e-3, True), Point("noisy", 101e-6, 30e-3, True, energy_converged=False)]
    assert best(points, Objective("energy", 0.05)).key == "steady"
    assert best(points, Objective("energy", 0.05), allow_unconverged=True).key == "noisy"
    assert best(points[1:], Objective("energy", 0.05)) is None
    assert best(points[1:], Objective("latency")).key == "noisy"  # its latency is as good as any


def test_slack_bound_uses_the_fastest_point_even_without_energy():
    # The fastest point has no energy; "near" is 4 % slower than it, "fast2" 10 % slower.
    points = [Point("fastest", 100e-6), Point("near", 104e-6, 30e-3, True), Point("fast2", 110e-6, 10e-3, True)]
    assert best(points, Objective("energy", 0.05)).key == "near"


def test_score_ranks_points_outside_the_slack_after_those_inside():
    objective = Objective("energy", 0.05)
    inside = objective.score(104e-6, 1.0, fastest_s=100e-6)
    outside = objective.score(106e-6, 1e-3, fastest_s=100e-6)
    further = objective.score(120e-6, 1e-3, fastest_s=100e-6)
    assert inside < outside < further
    assert objective.score(1e-6, None, 1e-6) == math.inf


def test_only_an_energy_objective_with_a_slack_is_bounded_by_the_fastest():
    slack = Objective.parse("energy@0.05")
    assert slack.bounded_by_fastest
    assert slack.within_slack(105e-6, 100e-6) and not slack.within_slack(105.1e-6, 100e-6)
    assert not any(Objective.parse(t).bounded_by_fastest for t in ("latency", "edp", "energy@none"))


def test_pareto_front_is_sorted_and_dominance_free():
    front = pareto_front(POINTS + [Point("dominated", 120e-6, 45e-3, True)])
    assert [p.key for p in front] == ["fast", "near", "slow"]


@pytest.mark.parametrize("text,label", [("latency", "latency"), ("energy", "energy@0.05"),
                                        ("energy@0.1", "energy@0.1"), ("energy@none", "energy@none"), ("EDP", "edp")])
def test_parse_and_label_round_trip(text, label):
    objective = Objective.parse(text)
    assert objective.label == label
    assert Objective.parse(objective.label) == objective


@pytest.mark.parametrize("kind,slack", [("speed", None), ("latency", 0.05), ("energy", -0.1), ("energy", math.nan)])
def test_bad_objectives_are_refused(kind, slack):
    with pytest.raises(ObjectiveError):
        Objective(kind, slack)


@pytest.mark.parametrize("text,max_slowdown,label", [
    ("energy@0.05", None, "energy@0.05"), ("Energy @ 0.1", None, "energy@0.1"), ("energy", "0.1", "energy@0.1"),
    ("energy@0.1", "0.1", "energy@0.1"), ("energy", "none", "energy@none"), ("energy@.5", None, "energy@0.5"),
    ("energy", 0.2, "energy@0.2"), (" latency ", None, "latency"), ("energy", "0.00001", "energy@1e-05"),
    ("energy@1e-05", None, "energy@1e-05")])
def test_one_spelling_of_the_slowdown(text, max_slowdown, label):
    assert Objective.parse(text, max_slowdown).label == label


@pytest.mark.parametrize("text,max_slowdown,message", [
    ("energy@0.1", "0.2", "contradicts"), ("latency@0.1", None, "only the energy objective"),
    ("edp", "0.1", "energy objective only"), ("energy@+0.1", None, "bad slowdown"),
    ("energy@0_05", None, "bad slowdown"), ("energy@\uff11", None, "bad slowdown"), ("energy@", None, "bad slowdown"),
("energy@nan", None, "bad slowdown"), ("energy@12", None, "must be in"),
    ("fastest", None, "unknown objective")])
def test_bad_spellings_are_refused(text, max_slowdown, message):
    with pytest.raises(ObjectiveError, match=message):
        Objective.parse(text, max_slowdown)
