"""The candidate layer: every model a user could ship, built, exported and measured the same way on the target."""
from .baselines import EXACT, best_exact, exact_ensembles, int8_ensembles, mean_of_members
from .jobs import Job, evaluate, fingerprint, run_points
from .row import KINDS, Candidate, Point, measure, torch_predictions, with_agreement

__all__ = ["EXACT", "KINDS", "Candidate", "Job", "Point", "best_exact", "evaluate", "exact_ensembles",
           "fingerprint", "int8_ensembles", "mean_of_members", "measure", "run_points", "torch_predictions", "with_agreement"]
