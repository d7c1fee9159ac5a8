"""monitor: notice harmful intent without refusal, at runtime (:func:`fit_monitor`, :class:`Monitor`, ``watch``)."""

from .api import MonitorEval, MonitorRun, evaluate_monitor, fit_monitor, run_monitor
from .artifact import Monitor, MonitorMismatch, Reader
from .fit import default_calibration, default_fit_prompts
from .reanchor import is_reanchored, reanchor
from .watch import Verdict, Watch, verdict_kind

__all__ = ["Monitor", "MonitorEval", "MonitorMismatch", "MonitorRun", "Reader", "Verdict", "Watch",
           "default_calibration", "default_fit_prompts", "evaluate_monitor", "fit_monitor", "is_reanchored", "reanchor", "run_monitor", "verdict_kind"]
