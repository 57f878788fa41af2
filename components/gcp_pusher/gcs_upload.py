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
                 say: Callable[[str], None]):
        from google.cloud.storage.retry import DEFAULT_RETRY

        self.client = client
        self.bucket_name = bucket_name
        self.workers = workers
        self.say = say
        # The client's own policy: 408/429/5xx and dropped connections, with exponential backoff.
        self.retry = DEFAULT_RETRY.with_deadline(retry_seconds)

    def bucket(self):
        """A handle only: reading the bucket's metadata would need storage.buckets.get, which
        roles/storage.objectAdmin (all a push needs) does not grant. A missing bucket shows as a 404 on
        the first object call instead (see `_error`)."""
        return self.client.bucket(self.bucket_name)

    def existing_fingerprint(self, bucket, object_prefix: str) -> str | None:
        from google.api_core import exceptions

        blob = bucket.blob(f"{object_prefix}/{MARKER}")
        try:
            return json.loads(blob.download_as_bytes(retry=self.retry)).get("fingerprint")
        except exceptions.NotFound:
            return None  # no marker: a first push (a missing bucket fails the first upload, by name)
        except exceptions.GoogleAPICallError as exc:
            raise _error(exc, f"gs://{self.bucket_name}/{blob.name}", "storage.objects.get") from None
        except ValueError:
            return None  # a damaged marker: upload again, which rewrites it

    def upload(self, files: list[UploadFile], object_prefix: str, marker: dict) -> bool:
        """Uploads and verifies; False when the same content was already complete there."""
        from google.api_core import exceptions

        bucket = self.bucket()
        content = fingerprint(files, object_prefix)
        if self.existing_fingerprint(bucket, object_prefix) == content:
            self.verify(bucket, files, object_prefix)
            self.say(f"gs://{self.bucket_name}/{object_prefix}/ already holds this model (verified); not uploaded again")
            return False
        total = sum(f.size for f in files)
        self.say(f"uploading {len(files)} files ({total / 1024:.1f} KiB) to gs://{self.bucket_name}/{object_prefix}/")
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for future in [pool.submit(self._upload_one, bucket, item) for item in files]:
                future.result()
        self.verify(bucket, files, object_prefix)
        try:
            bucket.blob(f"{object_prefix}/{MARKER}").upload_from_string(
                json.dumps({**marker, "fingerprint": content}, indent=2, sort_keys=True),
                content_type="application/json", retry=self.retry)
        except exceptions.GoogleAPICallError as exc:
            raise _error(exc, f"gs://{self.bucket_name}/{object_prefix}/{MARKER}", "storage.objects.create",
                         writing=True) from None
        return True

    def _upload_one(self, bucket, item: UploadFile) -> None:
        from google.api_core import exceptions

        blob = bucket.blob(item.object_name, chunk_size=CHUNK_BYTES)
        try:
            blob.upload_from_filename(str(item.local), retry=self.retry)
        except exceptions.GoogleAPICallError as exc:
            raise _error(exc, f"gs://{self.bucket_name}/{item.object_name}", "storage.objects.create",
                         writing=True) from None
        except Exception as exc:  # resumable-media and transport errors carry no API status
            raise GcsError(f"upload of gs://{self.bucket_name}/{item.object_name} failed: {exc}; "
                           "run the pipeline again to retry the push") from None

    def verify(self, bucket, files: list[UploadFile], object_prefix: str) -> None:
        """Lists the prefix and compares every object's size and checksums with the local file."""
        from google.api_core import exceptions

        try:
            listed = {blob.name: blob for blob in self.client.list_blobs(bucket, prefix=f"{object_prefix}/",
                                                                         retry=self.retry)}
        except exceptions.GoogleAPICallError as exc:
            raise _error(exc, f"gs://{self.bucket_name}/{object_prefix}/", "storage.objects.list") from None
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


def _error(exc, resource: str, permission: str, *, writing: bool = False) -> GcsError:
    """One line for a failed Cloud Storage call: a missing bucket by name (a 404 when `writing` an object
    can mean nothing else), and for a 403 the permission the call needs (every one a push uses is in
    roles/storage.objectAdmin on the bucket)."""
    from google.api_core import exceptions

    bucket = resource[len("gs://"):].split("/", 1)[0]
    if isinstance(exc, exceptions.NotFound) and (writing or "bucket" in str(exc.message).lower()):
        return GcsError(f"bucket gs://{bucket} does not exist; create it with "
                        f"`gcloud storage buckets create gs://{bucket} --location=REGION`")
    if isinstance(exc, exceptions.Forbidden):
        return GcsError(f"permission denied on {resource}: the account lacks {permission} on gs://{bucket} "
                        f"(grant roles/storage.objectAdmin on the bucket) ({exc.message})")
    return GcsError(f"{resource}: {exc.code} {exc.message}")
