"""The backend's own exception types; ``ml_backend.app`` maps them to HTTP statuses in one place."""

from __future__ import annotations


class BackendError(Exception):
    """An error a client can act on; ``status`` is the HTTP status it maps to."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(BackendError):
    status = 400


class Unauthorized(BackendError):
    """Basic auth missing or wrong (the answer carries a ``WWW-Authenticate`` challenge)."""

    status = 401


class UnprovenWebhook(BackendError):
    """A webhook event without its project's ``X-RLHF-Webhook-Secret`` (ml_backend/trust.py)."""

    status = 401


class NotFound(BackendError):
    status = 404


class UnsupportedLabelConfig(BackendError):
    """The project's label config has nothing this backend can learn from or predict."""

    status = 422


class AnnotationMismatch(BackendError):
    """An annotation's result does not fit the label config it was made with."""

    status = 422


class TooLarge(BackendError):
    """A request asks for more than the backend's configured bounds allow."""

    status = 413


class LabelConfigTooLarge(TooLarge):
    pass
