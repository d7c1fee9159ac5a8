"""probes: linear probes layer by layer (:func:`fit_probes`), the :class:`Probe` artifact and its monitor."""

from .api import ProbeReport, fit_probes
from .artifact import Probe

__all__ = ["Probe", "ProbeReport", "fit_probes"]
