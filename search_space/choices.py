"""Sampling helpers shared by etune's own schedule rules (splitk, rowsoftmax, fused)."""
from __future__ import annotations


def uniform_choice(sch, values):
    """``sch.sample_categorical`` over ``values``, each equally likely: a decision MetaSchedule's
    mutators redraw and crossover exchanges like any other."""
    values = list(values)
    return sch.sample_categorical(candidates=values, probs=[1.0 / len(values)] * len(values))
