"""Energy (and latency) cost models: kernel features, XGBoost ensembles with a weighted loss and
uncertainty, the policies that pick which candidates get a real energy measurement, model-free
baselines to compare them with, and metrics.

Heavy imports (TVM, XGBoost) happen inside the functions that need them.
"""
from .baselines import ConstantPowerModel
from .features import FEATURE_NAMES, candidate_features, features_of, to_matrix
from .metrics import mape, spearman, top_k_recall
from .model import DEFAULT_ENERGY_MODE, CostModel, ModelError
from .policy import ExpectedImprovementPolicy, FastestFirstPolicy, RandomPolicy, SelectionPolicy, UpdatePolicy

__all__ = ["ConstantPowerModel", "CostModel", "DEFAULT_ENERGY_MODE", "ExpectedImprovementPolicy", "FEATURE_NAMES",
           "FastestFirstPolicy", "ModelError", "RandomPolicy", "SelectionPolicy", "UpdatePolicy",
           "candidate_features", "features_of", "mape", "spearman", "to_matrix", "top_k_recall"]
