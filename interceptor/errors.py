"""The one exception hierarchy of dns-interceptor.

Each subclass's docstring is its message; modules raise narrow subclasses and chain
third-party errors with ``raise ... from``.  The CLI prints ``str(error)`` and exits non-zero,
so no user ever sees a traceback for a problem they can fix.
"""

from __future__ import annotations


class InterceptorError(Exception):
    """dns-interceptor failed."""

    def __init__(self, detail: str = "") -> None:
        self.detail = detail
        super().__init__(detail)

    def __str__(self) -> str:
        head = (self.__doc__ or type(self).__name__).strip().splitlines()[0].rstrip(".")
        return f"{head}: {self.detail}" if self.detail else head


class ConfigError(InterceptorError):
    """invalid configuration."""


class SourceError(InterceptorError):
    """cannot read the service source."""


class ObjectError(InterceptorError):
    """invalid Kubernetes object."""

    def __init__(self, obj: str, field: str, problem: str) -> None:
        self.obj = obj
        self.field = field
        self.problem = problem
        super().__init__(f"{obj}: field {field}: {problem}")


class WireError(InterceptorError):
    """malformed DNS message."""
