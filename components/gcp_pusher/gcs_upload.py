"""A model release into Cloud Storage: parallel resumable uploads, then proof that every object arrived intact.

`<prefix>/<model>/<version>/` receives the SavedModel (and tflite/), then `conveyor-push.json` last: an
object prefix with that marker is complete, and a push that finds the marker with the same content
fingerprint uploads nothing again (a re-push of a version is idempotent).
"""
from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import google_crc32c

MARKER = "conveyor-push.json"
# Setting a chunk size makes the client use resumable uploads for every file, so a dropped connection
# resumes the file instead of restarting it (the default switches to resumable only above 8 MiB).
CHUNK_BYTES = 8 * 1024 * 1024
SESSION_RESTARTS = 1  # a resumable session lost (404/410) is started again once per file


@dataclass(frozen=True)
class UploadFile:
    local: Path
    object_name: str
    size: int
    md5: str  # base64, as Cloud Storage reports it
    crc32c: str  # base64, big-endian, as Cloud Storage reports it


def _checksums(path: Path) -> tuple[str, str]:
    md5, crc = hashlib.md5(), google_crc32c.Checksum()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            md5.update(block)
            crc.update(block)
    return base64.b64encode(md5.digest()).decode(), base64.b64encode(crc.digest()).decode()


def plan(files: list[tuple[Path, str]], object_prefix: str) -> list[UploadFile]:
    planned = []
    for local, relative in files:
        md5, crc = _checksums(local)
        planned.append(UploadFile(local, f"{object_prefix}/{relative}", local.stat().st_size, md5, crc))
    return planned


def fingerprint(files: list[UploadFile], object_prefix: str) -> str:
    digest = hashlib.sha256()
    for item in sorted(files, key=lambda f: f.object_name):
        digest.update(f"{item.object_name[len(object_prefix):]}:{item.md5}:{item.size}\n".encode())
    return digest.hexdigest()


class GcsUploader:
    def __init__(self, client, bucket_name: str, *, retry_seconds: float, workers: int,
                 say: Callable[[str], None], timeout: float = 60.0):
        from google.cloud.storage.retry import DEFAULT_RETRY

        self.client = client
        self.bucket_name = bucket_name
        self.workers = workers
        self.say = say
        # The client's own policy: 408/429/5xx, resets and timeouts, with exponential backoff (not 4xx);
        # `timeout` bounds each attempt (connecting and each read; the session bounds a whole answer).
        # Backoff starts at a tenth of the budget (at most 1 s) and grows to half of it (at most 30 s).
        self.retry = DEFAULT_RETRY.with_deadline(retry_seconds).with_delay(
            initial=min(1.0, retry_seconds / 10), maximum=min(30.0, retry_seconds / 2), multiplier=2.0)
        self.retry_seconds = retry_seconds
        self.timeout = timeout

    def bucket(self):
        """A handle only: reading the bucket's metadata would need storage.buckets.get, which
        roles/storage.objectAdmin (all a push needs) does not grant. A missing bucket shows as a 404 on
        the first object call instead (see `_error`)."""
        return self.client.bucket(self.bucket_name)

    def existing_fingerprint(self, bucket, object_prefix: str) -> str | None:
        from google.api_core import exceptions

        blob = bucket.blob(f"{object_prefix}/{MARKER}")
        try:
            data = blob.download_as_bytes(retry=self.retry, timeout=self.timeout)
        except exceptions.NotFound:
            return None  # no marker: a first push (a missing bucket fails the first upload, by name)
        except Exception as exc:  # every way a call can fail: one line
            raise _error(exc, f"gs://{self.bucket_name}/{blob.name}", "storage.objects.get",
                         retry_seconds=self.retry_seconds) from None
        try:
            return json.loads(data).get("fingerprint")
        except (ValueError, AttributeError):
            return None  # a damaged marker: upload again, which rewrites it

    def upload(self, files: list[UploadFile], object_prefix: str, marker: dict) -> bool:
        """Uploads and verifies; False when the same content was already complete there."""
        bucket = self.bucket()
        content = fingerprint(files, object_prefix)
        if self.existing_fingerprint(bucket, object_prefix) == content:
            self.verify(bucket, files, object_prefix)
            self.say(f"gs://{self.bucket_name}/{object_prefix}/ already holds this model (verified); not uploaded again")
            return False
        total = sum(f.size for f in files)
        self.say(f"uploading {len(files)} files ({total / 1024:.1f} KiB) to gs://{self.bucket_name}/{object_prefix}/")
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            try:
                for future in [pool.submit(self._upload_one, bucket, item) for item in files]:
                    future.result()
            except BaseException:
                # the first failure fails the push: start no more uploads
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        self.verify(bucket, files, object_prefix)
        try:
            bucket.blob(f"{object_prefix}/{MARKER}").upload_from_string(
                json.dumps({**marker, "fingerprint": content}, indent=2, sort_keys=True),
                content_type="application/json", retry=self.retry, timeout=self.timeout)
        except Exception as exc:
            raise _error(exc, f"gs://{self.bucket_name}/{object_prefix}/{MARKER}", "storage.objects.create",
                         writing=True, retry_seconds=self.retry_seconds) from None
        return True

    def _upload_one(self, bucket, item: UploadFile) -> None:
        resource = f"gs://{self.bucket_name}/{item.object_name}"
        for attempt in range(SESSION_RESTARTS + 1):
            blob = bucket.blob(item.object_name, chunk_size=CHUNK_BYTES)
            try:
                blob.upload_from_filename(str(item.local), retry=self.retry, timeout=self.timeout)
                return
            except Exception as exc:  # every way a call can fail: one line
                if _lost_session(exc) and attempt < SESSION_RESTARTS:
                    self.say(f"the upload session of {resource} was lost ({exc.code}); "
                             "starting the file again")
                    continue
                raise _error(exc, resource, "storage.objects.create", writing=True,
                             retry_seconds=self.retry_seconds) from None

    def verify(self, bucket, files: list[UploadFile], object_prefix: str) -> None:
        """Lists the prefix and compares every object's size and checksums with the local file."""
        try:
            found = self.client.list_blobs(bucket, prefix=f"{object_prefix}/", retry=self.retry,
                                           timeout=self.timeout)
            listed = {blob.name: blob for blob in found}
        except Exception as exc:
            raise _error(exc, f"gs://{self.bucket_name}/{object_prefix}/", "storage.objects.list",
                         retry_seconds=self.retry_seconds) from None
        for item in files:
            blob = listed.get(item.object_name)
            if blob is None:
                raise GcsError(f"gs://{self.bucket_name}/{item.object_name} is missing after the upload")
            mismatch = [name for name, remote, local in (("size", blob.size, item.size), ("md5", blob.md5_hash, item.md5),
                                                          ("crc32c", blob.crc32c, item.crc32c))
                        if remote is not None and remote != local]
            if mismatch:
                raise GcsError(f"gs://{self.bucket_name}/{item.object_name}: {', '.join(mismatch)} differ from "
                               f"{item.local} after the upload; run the pipeline again")


class GcsError(Exception):
    """A push to Cloud Storage that did not complete; the message names the object or bucket."""


def _lost_session(exc: Exception) -> bool:
    """A 404/410 on a resumable upload's session URL: the session expired or was lost (not the bucket)."""
    from google.api_core import exceptions

    response = getattr(exc, "response", None)
    url = getattr(getattr(response, "request", None), "url", None) or getattr(response, "url", "") or ""
    return (isinstance(exc, exceptions.GoogleAPICallError) and exc.code in (404, 410)
            and "upload_id=" in str(url))


def _error(exc, resource: str, permission: str, *, writing: bool = False,
           retry_seconds: float = 0) -> GcsError:
    """One line for a failed Cloud Storage call: a missing bucket by name (a 404 when `writing` an object
    can mean nothing else), and for a 403 the permission the call needs (every one a push uses is in
    roles/storage.objectAdmin on the bucket); a lost upload session, bad credentials, an answer too large,
    a timeout or a dropped connection (each retried for `retry_seconds` first) say so."""
    import requests
    from google.api_core import exceptions
    from google.auth.exceptions import GoogleAuthError, TransportError

    from conveyor_ml.components.gcp_pusher.settings import ResponseTooLarge

    bucket = resource[len("gs://"):].split("/", 1)[0]
    again = "run the pipeline again (a rerun uploads into the same prefix)"
    retried = f"retried for gcp_pusher.retry_seconds ({retry_seconds:g}s)"
    if isinstance(exc, exceptions.RetryError) and exc.cause is not None:
        exc = exc.cause
    if _lost_session(exc):
        return GcsError(f"the resumable upload session of {resource} was lost twice ({exc.code}); {again}")
    if isinstance(exc, exceptions.Unauthorized) or (isinstance(exc, GoogleAuthError)
                                                    and not isinstance(exc, TransportError)):
        return GcsError(f"Cloud Storage rejected the credentials on {resource} "
                        f"({getattr(exc, 'message', exc)}): "
                        "run `gcloud auth application-default login` or fix gcp_pusher.credentials")
    if isinstance(exc, exceptions.NotFound) and (writing or "bucket" in str(exc.message).lower()):
        return GcsError(f"bucket gs://{bucket} does not exist; create it with "
                        f"`gcloud storage buckets create gs://{bucket} --location=REGION`")
    if isinstance(exc, exceptions.Forbidden):
        return GcsError(f"permission denied on {resource}: the account lacks {permission} on gs://{bucket} "
                        f"(grant roles/storage.objectAdmin on the bucket) ({exc.message})")
    if isinstance(exc, exceptions.GoogleAPICallError):
        code = int(exc.code or 0)
        hint = f" ({retried}; {again})" if code in (408, 429) or code >= 500 else ""
        return GcsError(f"{resource}: {exc.code} {exc.message}{hint}")
    if isinstance(exc, ResponseTooLarge):
        return GcsError(f"{resource}: {exc}; is gcp_pusher.storage_endpoint a Cloud Storage endpoint?")
    if isinstance(exc, requests.exceptions.Timeout):
        return GcsError(f"{resource}: timed out ({retried}; raise gcp_pusher.retry_seconds on a slow "
                        "network)")
    if isinstance(exc, (requests.exceptions.RequestException, ConnectionError, TransportError)):
        return GcsError(f"{resource}: connection failed ({type(exc).__name__}; {retried}); {again}")
    return GcsError(f"{resource} failed: {type(exc).__name__}: {str(exc)[:200]}; {again}")
