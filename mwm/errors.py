"""One error root for mwm, with one subclass per area.

Each error carries the HTTP status and the DICOM status it maps to, so that the two ways in
(the HTTP API and the DICOM SCP) report the same failure the same way; the mapping itself is
done in one place on each side (``api.error_response`` and ``scp``).
"""

from __future__ import annotations


class MwmError(Exception):
    """Root of every error mwm raises on purpose."""

    http_status: int = 500
    dicom_status: int = 0xC000
    code: str = "internal_error"

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def to_json(self) -> dict[str, str | None]:
        return {"error": self.code, "message": self.message, "detail": self.detail}


class ConfigError(MwmError):
    """The configuration is invalid; the message names the key."""

    code = "invalid_configuration"
    http_status = 400


class PluginError(MwmError):
    """A plugin could not be found or loaded."""

    code = "plugin_error"


class BadRequest(MwmError):
    """The request is malformed."""

    code = "bad_request"
    http_status = 400


class InvalidDicom(MwmError):
    """The bytes are not a DICOM instance we can accept."""

    code = "invalid_dicom"
    http_status = 400
    # 0xC000-range: "cannot understand".
    dicom_status = 0xC210


class NotFound(MwmError):
    code = "not_found"
    http_status = 404


class Conflict(MwmError):
    code = "conflict"
    http_status = 409


class PayloadTooLarge(MwmError):
    code = "payload_too_large"
    http_status = 413
    dicom_status = 0xA700


class Unauthorized(MwmError):
    code = "unauthorized"
    http_status = 401


class Forbidden(MwmError):
    code = "forbidden"
    http_status = 403


class StorageError(MwmError):
    """Bytes could not be written or read; the caller may retry later."""

    code = "storage_unavailable"
    http_status = 507
    dicom_status = 0xA700  # Out of resources


class StorageFull(StorageError):
    code = "storage_full"


class DatabaseError(MwmError):
    code = "database_unavailable"
    http_status = 503
    dicom_status = 0xA700


class EngineError(MwmError):
    """An engine could not launch, poll or cancel a job."""

    code = "engine_error"
    http_status = 502

    def __init__(self, message: str, detail: str | None = None, *, retryable: bool = True) -> None:
        super().__init__(message, detail)
        self.retryable = retryable


class SinkError(MwmError):
    """A sink could not deliver; ``retryable`` says whether trying again can help."""

    code = "sink_error"
    http_status = 502

    def __init__(self, message: str, detail: str | None = None, *, retryable: bool = True) -> None:
        super().__init__(message, detail)
        self.retryable = retryable


class ShuttingDown(MwmError):
    code = "shutting_down"
    http_status = 503
    dicom_status = 0xA700
