"""The few Vertex AI calls a release needs, over the official client, with retries and one-line errors.

Every call goes through `VertexApi._send`, which in a dry run prints the method and its exact request body
instead of sending it (and answers lookups with "not found", so the plan shown is a first push's). A
"writes" dry run sends the reads (List*, Get*) and prints only the changes.
"""
from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Callable

from conveyor_ml.base.spec import GcpPusherSettings
from conveyor_ml.components.gcp_pusher import settings as gcp
from conveyor_ml.components.gcp_pusher.traffic import NEW, Deployed, TrafficChange

PLACEHOLDER_VERSION = "<new version id>"


class VertexError(Exception):
    """A Vertex AI call that failed for good; the message names the resource and what to do."""


HINTS = {
    401: "Google rejected the credentials: run `gcloud auth application-default login` or fix "
         "gcp_pusher.credentials",
    403: "the account needs roles/aiplatform.user on the project (and roles/iam.serviceAccountUser to deploy)",
    404: "check gcp_pusher.project and gcp_pusher.region",
    429: "quota exhausted; retried until gcp_pusher.retry_seconds ran out",
    500: "a Vertex AI server error",
    502: "a Vertex AI server error",
    503: "Vertex AI unavailable; retried until gcp_pusher.retry_seconds ran out",
    504: "a Vertex AI server error",
}
# Calls that may be repeated when the outcome of an attempt is unknown (a 5xx, a reset, a timeout): reads, and
# writes that set a state. UploadModel, CreateEndpoint, DeployModel and UndeployModel are not repeated then
# (a second UploadModel is a second version); the push fails and a rerun converges.
IDEMPOTENT = ("List", "Get", "MergeVersionAliases", "UpdateEndpoint")
RERUN = "the call may have taken effect or not; run the push again: it converges on what the endpoint holds"


class VertexApi:
    def __init__(self, settings: GcpPusherSettings, model_name: str, *, say: Callable[[str], None],
                 dry_run: bool | str):
        self.settings = settings
        self.display_name = gcp.display_name(settings, model_name)
        self.endpoint_display_name = gcp.endpoint_display_name(settings, model_name)
        self.location = gcp.location(settings)
        self.say = say
        self.dry_run = dry_run
        self.models = self.endpoints = None
        if dry_run is not True:
            self.models, self.endpoints = gcp.vertex_clients(settings)
        self.retry = _retry(settings.retry_seconds, say, idempotent=True)
        self.write_retry = _retry(settings.retry_seconds, say, idempotent=False)

    def _send(self, method: str, request, *, resource: str, long_running: bool = False):
        reading = method.split(".")[-1].startswith(("List", "Get"))
        if self.dry_run is True or (self.dry_run == "writes" and not reading):
            body = json.dumps(type(request).to_dict(request, preserving_proto_field_name=False, use_integers_for_enums=False,
                                                    always_print_fields_with_no_presence=False), sort_keys=True)
            self.say(f"would call {method}: {body}")
            return None
        from google.api_core import exceptions

        client = self.models if method.startswith("ModelService") else self.endpoints
        call = getattr(client, _snake(method.split(".")[-1]))
        name = method.split(".")[-1]
        idempotent = name.startswith(IDEMPOTENT)
        retry = self.retry if idempotent else self.write_retry
        try:
            answer = call(request=request, retry=retry, timeout=gcp.call_seconds(self.settings))
            if long_running:
                return answer.result(timeout=gcp.operation_seconds(self.settings), retry=self.retry)
            return answer
        except exceptions.RetryError as exc:
            raise VertexError(f"Vertex AI {method} on {resource} still failing after "
                              f"{self.settings.retry_seconds:g}s of retries: "
                              f"{_describe(exc.cause, idempotent)}") from None
        except concurrent.futures.TimeoutError:
            raise VertexError(f"Vertex AI {method} on {resource}: the operation did not finish within "
                              f"{gcp.operation_seconds(self.settings):g}s; it may still finish on Vertex AI: "
                              "run the push again, which converges on what the endpoint then holds") from None
        except Exception as exc:  # every way a call can fail: one line
            raise VertexError(f"Vertex AI {method} on {resource} failed: "
                              f"{_describe(exc, idempotent)}") from None

    # Model Registry
    def find_model(self) -> str | None:
        from google.cloud import aiplatform_v1 as v1

        request = v1.ListModelsRequest(parent=self.location, filter=f'display_name="{self.display_name}"')
        found = self._send("ModelService.ListModels", request, resource=self.location)
        return next((model.name for model in found), None) if found is not None else None

    def upload_version(self, artifact_uri: str, *, parent_model: str | None,
                       labels: dict[str, str]) -> tuple[str, str]:
        """(model resource name, version id) of the new version."""
        from google.cloud import aiplatform_v1 as v1

        model = v1.Model(display_name=self.display_name, artifact_uri=artifact_uri,
                         container_spec=v1.ModelContainerSpec(image_uri=self.settings.serving_image),
                         labels=labels)
        request = v1.UploadModelRequest(parent=self.location, model=model, parent_model=parent_model or "")
        answer = self._send("ModelService.UploadModel", request, resource=f"model {self.display_name}",
                            long_running=True)
        if answer is None:
            return parent_model or f"{self.location}/models/<new model>", PLACEHOLDER_VERSION
        return answer.model, answer.model_version_id

    def move_alias(self, model: str, version: str, alias: str) -> None:
        """Vertex AI keeps an alias on one version of a model: merging it onto this one moves it."""
        from google.cloud import aiplatform_v1 as v1

        request = v1.MergeVersionAliasesRequest(name=f"{model}@{version}", version_aliases=[alias])
        self._send("ModelService.MergeVersionAliases", request, resource=f"{model}@{version}")

    # Endpoints
    def _endpoint_named(self) -> str | None:
        from google.cloud import aiplatform_v1 as v1

        request = v1.ListEndpointsRequest(parent=self.location, filter=f'display_name="{self.endpoint_display_name}"')
        found = self._send("EndpointService.ListEndpoints", request, resource=self.location)
        return next((endpoint.name for endpoint in found), None) if found is not None else None

    def find_or_create_endpoint(self, labels: dict[str, str]) -> str:
        from google.cloud import aiplatform_v1 as v1

        existing = self._endpoint_named()
        if existing:
            return existing
        request = v1.CreateEndpointRequest(parent=self.location,
                                           endpoint=v1.Endpoint(display_name=self.endpoint_display_name, labels=labels))
        created = self._send("EndpointService.CreateEndpoint", request,
                             resource=f"endpoint {self.endpoint_display_name}", long_running=True)
        if created is not None:
            self.say(f"created endpoint {created.name}")
        return created.name if created is not None else f"{self.location}/endpoints/<new endpoint>"

    def find_endpoint(self) -> str:
        name = self._endpoint_named()
        if name is None and not self.dry_run:
            raise VertexError(f"no Vertex AI endpoint named {self.endpoint_display_name!r} in {self.location}; "
                              "push a model first")
        return name or f"{self.location}/endpoints/<{self.endpoint_display_name}>"

    def deployed(self, endpoint: str) -> list[Deployed]:
        from google.cloud import aiplatform_v1 as v1

        answer = self._send("EndpointService.GetEndpoint", v1.GetEndpointRequest(name=endpoint), resource=endpoint)
        if answer is None:
            return []
        split = dict(answer.traffic_split)
        return [Deployed(id=d.id, model=d.model, version=d.model_version_id or "1",
                         created=_seconds(d.create_time), traffic=int(split.get(d.id, 0)))
                for d in answer.deployed_models]

    def deploy(self, endpoint: str, model: str, version: str, split: dict[str, int]) -> str:
        """Deploys `model@version` with the traffic split (NEW is the model deployed); returns its id."""
        from google.cloud import aiplatform_v1 as v1

        resources = v1.DedicatedResources(machine_spec=v1.MachineSpec(machine_type=self.settings.machine_type),
                                          min_replica_count=self.settings.min_replicas,
                                          max_replica_count=self.settings.max_replicas)
        deployed_model = v1.DeployedModel(model=f"{model}@{version}", display_name=f"{self.display_name}-v{version}",
                                          dedicated_resources=resources)
        request = v1.DeployModelRequest(endpoint=endpoint, deployed_model=deployed_model, traffic_split=split)
        answer = self._send("EndpointService.DeployModel", request, resource=endpoint, long_running=True)
        return answer.deployed_model.id if answer is not None else "<new deployed model id>"

    def set_traffic(self, endpoint: str, split: dict[str, int]) -> None:
        from google.cloud import aiplatform_v1 as v1
        from google.protobuf import field_mask_pb2

        request = v1.UpdateEndpointRequest(endpoint=v1.Endpoint(name=endpoint, traffic_split=split),
                                           update_mask=field_mask_pb2.FieldMask(paths=["traffic_split"]))
        self._send("EndpointService.UpdateEndpoint", request, resource=endpoint)

    def undeploy(self, endpoint: str, deployed_model_id: str) -> None:
        from google.cloud import aiplatform_v1 as v1

        request = v1.UndeployModelRequest(endpoint=endpoint, deployed_model_id=deployed_model_id)
        self._send("EndpointService.UndeployModel", request, resource=f"{endpoint} (deployed model {deployed_model_id})",
                   long_running=True)

    def apply(self, endpoint: str, change: TrafficChange) -> None:
        """Moves traffic first, then undeploys what no longer has any (Vertex refuses to undeploy a model
        that still receives traffic)."""
        if NEW in change.split:
            raise ValueError("a split naming the new model goes with deploy()")
        self.set_traffic(endpoint, change.split)
        for deployed_model_id in change.undeploy:
            self.undeploy(endpoint, deployed_model_id)


def _seconds(timestamp) -> float:
    """A create_time as seconds; the REST client hands back either a datetime or a raw protobuf Timestamp."""
    if timestamp is None:
        return 0.0
    if hasattr(timestamp, "timestamp"):
        return timestamp.timestamp()
    return timestamp.seconds + timestamp.nanos / 1e9


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


def _describe(exc: BaseException | None, idempotent: bool) -> str:
    """One line for why a call failed, with what to do."""
    import requests
    from google.api_core import exceptions
    from google.auth.exceptions import GoogleAuthError, TransportError
    from google.protobuf import json_format

    if isinstance(exc, exceptions.GoogleAPICallError):
        code = exc.code
        hint = HINTS.get(int(code)) if code else None
        if code and int(code) >= 500 and not idempotent:
            hint = f"{hint}; {RERUN}"
        elif code and int(code) >= 500:
            hint = f"{hint}; retried until gcp_pusher.retry_seconds ran out"
        return f"{code} {exc.message}" + (f" ({hint})" if hint else "")
    if isinstance(exc, gcp.ResponseTooLarge):
        return f"{exc}; is gcp_pusher.vertex_endpoint a Vertex AI endpoint?"
    if isinstance(exc, (json_format.ParseError, ValueError)):
        return (f"the answer is not the documented JSON ({str(exc)[:200]}); "
                "is gcp_pusher.vertex_endpoint a Vertex AI endpoint?")
    if isinstance(exc, requests.exceptions.Timeout):
        return ("timed out (an attempt has gcp_pusher.retry_seconds, at most 60s); raise "
                "gcp_pusher.retry_seconds on a slow network"
                + ("" if idempotent else f"; {RERUN}"))
    if isinstance(exc, requests.exceptions.RequestException):
        return (f"connection failed ({type(exc).__name__}); check the network"
                + (" (retried until gcp_pusher.retry_seconds ran out)" if idempotent else f"; {RERUN}"))
    if isinstance(exc, TransportError):
        return f"could not reach Google's token service ({str(exc)[:200]}); check the network"
    if isinstance(exc, GoogleAuthError):
        return f"{exc} ({HINTS[401]})"
    return f"{type(exc).__name__}: {exc}"


def _retry(seconds: float, say: Callable[[str], None], *, idempotent: bool):
    """429 and 503 mean the call was not acted on: every call retries them. Other 5xx, resets and timeouts
    leave the outcome unknown: only calls that may be repeated retry them."""
    import requests
    from google.api_core import exceptions
    from google.api_core.retry import Retry, if_exception_type

    def report(error: Exception) -> None:
        say(f"Vertex AI answered {getattr(error, 'code', None) or type(error).__name__}; retrying with backoff")

    kinds = (exceptions.TooManyRequests, exceptions.ServiceUnavailable, requests.exceptions.ConnectTimeout)
    if idempotent:
        kinds += (exceptions.InternalServerError, exceptions.BadGateway, exceptions.GatewayTimeout,
                  requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                  requests.exceptions.ChunkedEncodingError)
    return Retry(predicate=if_exception_type(*kinds), initial=min(0.5, seconds / 10),
                 maximum=min(10.0, seconds / 2), multiplier=2.0, timeout=seconds, on_error=report)
