"""Energy (and latency) cost models: kernel features, XGBoost ensembles with a weighted loss and
uncertainty, the update policy that picks which candidates get a real energy measurement, and metrics.

Heavy imports (TVM, XGBoost) happen inside the functions that need them.
"""
from .features import FEATURE_NAMES, candidate_features, features_of, to_matrix
from .metrics import mape, spearman, top_k_recall
from .model import DEFAULT_ENERGY_MODE, CostModel, ModelError
from .policy import UpdatePolicy

__all__ = ["CostModel", "DEFAULT_ENERGY_MODE", "FEATURE_NAMES", "ModelError", "UpdatePolicy",
           "candidate_features", "features_of", "mape", "spearman", "to_matrix", "top_k_recall"]
