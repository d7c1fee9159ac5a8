"""Audit a checkpoint or a live model for removed refusal machinery (issue 16).

* :func:`audit_checkpoint`: weights against a reference (:mod:`.weights`) or alone (:mod:`.signature`);
* :func:`make_fingerprint`: a trusted model's harm directions, writer norms, tensor sums and canary scores,
  which later ``audit_checkpoint(path, fingerprint=...)`` calls compare against (:mod:`.fingerprint`);
* :func:`audit_runtime`: hooks, adapters, swapped modules and parameters changed since load (:mod:`.runtime`).
"""

from .api import audit_checkpoint, audit_runtime
from .fingerprint import Fingerprint, make_fingerprint
from .source import AuditInputError
from .types import AuditReport, RuntimeAudit, SignatureAudit, WeightAudit

__all__ = ["AuditInputError", "AuditReport", "Fingerprint", "RuntimeAudit", "SignatureAudit", "WeightAudit",
           "audit_checkpoint", "audit_runtime", "make_fingerprint"]
