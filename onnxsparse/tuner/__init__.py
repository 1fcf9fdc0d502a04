"""``onnxsparse tune``: search the passes for the fastest or smallest model within the user's accuracy
budget, measured on this machine, and show the frontier (see search.py, candidates.py, html.py)."""

from .candidates import OBJECTIVES, Candidate, Family, Objective
from .records import Record, TuneResult
from .search import tune

__all__ = ["OBJECTIVES", "Candidate", "Family", "Objective", "Record", "TuneResult", "tune"]
