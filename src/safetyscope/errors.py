"""The project's own error type: a one-line, user-facing message that names the fix.

Every error safetyscope raises on purpose for bad input or a bad environment derives from
:class:`SafetyscopeError` (``PromptError``, ``SiteError``, ``PositionError``, ``ArtifactError``,
``ArchitectureError``, ``ModelLoadError``, ``ChatTemplateError``, ``OutOfMemory``, ``NaNActivationError``,
``SettingsError``, ...). Each also keeps its historical base (``ValueError``, ``RuntimeError``, ...), so
``except ValueError`` in existing code still catches it. The CLI prints these as one ``error:`` line;
anything else is a bug and is shown with its traceback.
"""

from __future__ import annotations


class SafetyscopeError(Exception):
    """A one-line, user-facing error whose message names the fix."""


class SettingsError(SafetyscopeError, ValueError):
    """A setting (command-line flag or config-file value) that cannot work; the message names the fix."""


class SafetyscopeWarning(UserWarning):
    """Input that is accepted but probably not what the user meant (the CLI prints it as ``warning: ...``)."""
