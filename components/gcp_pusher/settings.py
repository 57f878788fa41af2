"""Names and Google clients derived from the gcp_pusher section of a spec."""
from __future__ import annotations

import re

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.spec import GcpPusherSettings


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
    from google.cloud import storage

    options = {"api_endpoint": settings.storage_endpoint} if settings.storage_endpoint else None
    return storage.Client(project=settings.project, credentials=credentials(settings), client_options=options)


def vertex_clients(settings: GcpPusherSettings):
    """(ModelServiceClient, EndpointServiceClient) over REST, regional as Vertex AI requires."""
    from google.cloud import aiplatform_v1

    endpoint = settings.vertex_endpoint or f"https://{settings.region}-aiplatform.googleapis.com"
    options = {"api_endpoint": endpoint}
    creds = credentials(settings)
    return (aiplatform_v1.ModelServiceClient(credentials=creds, transport="rest", client_options=options),
            aiplatform_v1.EndpointServiceClient(credentials=creds, transport="rest", client_options=options))


def label_value(text: str) -> str:
    """Vertex AI labels: lowercase letters, digits, '-' and '_', at most 63 characters."""
    return re.sub(r"[^a-z0-9_-]", "-", text.lower())[:63]
