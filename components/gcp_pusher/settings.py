"""Names and Google clients derived from the gcp_pusher section of a spec."""
from __future__ import annotations

import re
import time

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.spec import GcpPusherSettings

# Bounds on every call to Google Cloud (the per-call one follows `retry_seconds`, which tests lower).
CALL_SECONDS = 60.0  # one HTTP request: connecting, each read, and the whole answer; at most retry_seconds
MAX_RESPONSE_BYTES = 16 * 1024 * 1024  # an answer larger than this is refused unread (none legitimately is)


def call_seconds(settings: GcpPusherSettings) -> float:
    return min(CALL_SECONDS, settings.retry_seconds)


def operation_seconds(settings: GcpPusherSettings) -> float:
    return settings.operation_seconds


class ResponseTooLarge(Exception):
    """An answer over MAX_RESPONSE_BYTES: refused after reading at most that much."""


class _BoundedBody:
    """A response's urllib3 body that stops after MAX_RESPONSE_BYTES or when the call's time is up (a body
    that never ends would otherwise keep a read timeout from ever firing)."""

    def __init__(self, raw, url: str, deadline: float):
        self.__dict__.update(_raw=raw, _url=url, _deadline=deadline, _read=0)

    def __getattr__(self, name):
        return getattr(self._raw, name)

    def __setattr__(self, name, value):
        setattr(self._raw, name, value)

    def _count(self, chunk):
        self.__dict__["_read"] += len(chunk)
        if self._read > MAX_RESPONSE_BYTES:
            self._raw.close()
            raise ResponseTooLarge(f"the answer is larger than {MAX_RESPONSE_BYTES // (1024 * 1024)} MiB")
        if time.monotonic() > self._deadline:
            import requests

            self._raw.close()
            raise requests.exceptions.ReadTimeout(
                f"the answer did not end within the call's time ({self._url})")
        return chunk

    def stream(self, amt=65536, decode_content=None):
        """What urllib3's stream() yields, but a read returns what has arrived (read1) instead of waiting for
        `amt` bytes, so the deadline is checked while a body trickles in."""
        if self._raw.chunked and self._raw.supports_chunked_reads():
            for chunk in self._raw.read_chunked(amt, decode_content=decode_content):
                yield self._count(chunk)
            return
        while True:
            chunk = self._raw.read1(amt, decode_content=decode_content)
            if not chunk:
                return
            yield self._count(chunk)

    def read(self, amt=None, *args, **kwargs):
        amt = amt if amt is not None else MAX_RESPONSE_BYTES + 1
        return self._count(self._raw.read(amt, *args, **kwargs))


def bound_responses(session, seconds: float):
    """Makes every answer `session` (a requests.Session) receives bounded in size and time: a hook on the
    session, before requests reads the body."""
    def hook(response, **kwargs):
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > MAX_RESPONSE_BYTES:
            response.close()
            raise ResponseTooLarge(f"the answer is larger than {MAX_RESPONSE_BYTES // (1024 * 1024)} MiB "
                                   f"({length} bytes)")
        response.raw = _BoundedBody(response.raw, response.url, time.monotonic() + seconds)
        return response

    session.hooks["response"].append(hook)
    return session


def display_name(settings: GcpPusherSettings, model_name: str) -> str:
    return settings.model_display_name or model_name


def endpoint_display_name(settings: GcpPusherSettings, model_name: str) -> str:
    return settings.endpoint or f"{display_name(settings, model_name)}-endpoint"


def location(settings: GcpPusherSettings) -> str:
    return f"projects/{settings.project}/locations/{settings.region}"


def credentials(settings: GcpPusherSettings):
    """A key file named in the spec, anonymous credentials for an emulator, else Application Default
    Credentials. The key file's content is read by google-auth only: never printed or copied."""
    from google.auth import credentials as auth_credentials
    from google.auth import default as default_credentials
    from google.auth.exceptions import DefaultCredentialsError

    if settings.credentials:
        from google.oauth2 import service_account

        try:
            return service_account.Credentials.from_service_account_file(
                settings.credentials, scopes=["https://www.googleapis.com/auth/cloud-platform"])
        except (OSError, ValueError) as exc:
            raise ConveyorError(f"gcp_pusher.credentials: cannot use the key file {settings.credentials} "
                                f"({type(exc).__name__}); name a service-account JSON key or leave it out for "
                                "Application Default Credentials") from None
    if settings.storage_endpoint or settings.vertex_endpoint:
        return auth_credentials.AnonymousCredentials()
    try:
        found, _ = default_credentials(scopes=["https://www.googleapis.com/auth/cloud-platform"])
        return found
    except DefaultCredentialsError:
        raise ConveyorError("gcp_pusher: no Google credentials found; run `gcloud auth application-default login`, "
                            "name a key file in gcp_pusher.credentials, or set gcp_pusher.dry_run") from None


def storage_client(settings: GcpPusherSettings):
    from google.auth.transport.requests import AuthorizedSession
    from google.cloud import storage

    options = {"api_endpoint": settings.storage_endpoint} if settings.storage_endpoint else None
    creds = credentials(settings)
    session = bound_responses(AuthorizedSession(creds), call_seconds(settings))
    return storage.Client(project=settings.project, credentials=creds, client_options=options, _http=session)


def vertex_clients(settings: GcpPusherSettings):
    """(ModelServiceClient, EndpointServiceClient) over REST, regional as Vertex AI requires."""
    from google.cloud import aiplatform_v1

    endpoint = settings.vertex_endpoint or f"https://{settings.region}-aiplatform.googleapis.com"
    options = {"api_endpoint": endpoint}
    creds = credentials(settings)
    clients = tuple(kind(credentials=creds, transport="rest", client_options=options)
                    for kind in (aiplatform_v1.ModelServiceClient, aiplatform_v1.EndpointServiceClient))
    for client in clients:  # the REST transport's requests session: no public way to reach it
        bound_responses(client._transport._session, call_seconds(settings))
    return clients


def label_value(text: str) -> str:
    """Vertex AI labels: lowercase letters, digits, '-' and '_', at most 63 characters."""
    return re.sub(r"[^a-z0-9_-]", "-", text.lower())[:63]
