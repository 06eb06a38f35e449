"""S3 storage (AWS S3, MinIO, Ceph RGW, ...) through one shared aiobotocore client.

Objects live under ``<bucket>/<prefix>/<key>``. S3 makes a PUT visible only once it is complete,
so a reader never sees a partial object; files larger than ``multipart_threshold`` are uploaded
in parts read from the local file in a thread, and a failed multipart upload is aborted so no
orphaned parts are left to be billed.

Credentials come, in this order, from ``access_key_id``/``secret_access_key``, from
``credentials_file`` (the AWS shared-credentials format, section ``profile`` or ``default``),
or from the standard AWS chain (environment, ``profile`` in ``~/.aws``, instance metadata).
"""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import functools
import logging
import os
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

import botocore.exceptions
import botocore.loaders
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
    SSLError,
)

from ..errors import ConfigError, StorageError, StorageFull
from ..options import ByteSize, Duration, positive
from . import MAX_KEY_LENGTH, Storage, check_key

log = logging.getLogger(__name__)

MiB = 2**20
MIN_PART_SIZE = 5 * MiB  # S3's smallest part, except the last one
MAX_PART_SIZE = 5 * 2**30
MAX_PARTS = 10_000
MAX_COPY_SIZE = 5 * 2**30  # larger objects are copied in parts
COPY_PART_SIZE = 512 * MiB
DELETE_CONCURRENCY = 16
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_BAD_CREDENTIALS = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "InvalidClientTokenId",
    "AuthorizationHeaderMalformed",
}
_FULL = {"QuotaExceeded", "XMinioStorageFull", "InsufficientCapacity"}
_UNREACHABLE = (EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError)


def _check_bucket(value: str, where: str) -> None:
    if not _BUCKET.match(value) or ".." in value:
        raise ConfigError(f"{where}: {value!r} is not a valid S3 bucket name")


def _check_prefix(value: str, where: str) -> None:
    if value and (value != value.strip("/") or not _valid_key(value)):
        raise ConfigError(
            f"{where}: {value!r} is not a valid key prefix (segments of letters, digits, '.', '_', '-' "
            "separated by '/', without a leading or trailing '/')"
        )


def _check_endpoint(value: str | None, where: str) -> None:
    if value is not None and not re.match(r"^https?://[^/\s]+/?$", value):
        raise ConfigError(f"{where}: expected a URL such as 'https://s3.example.org:9000', got {value!r}")


def _check_part_size(value: int, where: str) -> None:
    if not MIN_PART_SIZE <= value <= MAX_PART_SIZE:
        raise ConfigError(f"{where}: a part must be between 5 MiB and 5 GiB, got {value} bytes")


def _valid_key(value: str) -> bool:
    try:
        check_key(value)
    except StorageError:
        return False
    return True


@dataclass(frozen=True)
class S3Options:
    """The ``[storage]`` table for ``kind = "s3"``."""

    bucket: str = field(metadata={"check": _check_bucket})
    endpoint_url: str | None = field(default=None, metadata={"check": _check_endpoint})
    region: str | None = None
    #: Keys are stored under ``<prefix>/``; lets several mwm installations share a bucket.
    prefix: str = field(default="", metadata={"check": _check_prefix})
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    #: An AWS shared-credentials file (INI); the section is ``profile``, else ``default``.
    credentials_file: Path | None = None
    profile: str | None = None
    addressing_style: Literal["path", "virtual", "auto"] = "auto"
    verify_tls: bool = True
    #: A PEM file of the certificate authorities to trust (e.g. a private CA or a self-signed server).
    ca_bundle: Path | None = None
    #: ``when_required`` sends no optional checksums: older Ceph RGW rejects the aws-chunked
    #: uploads with trailing checksums that ``when_supported`` makes over HTTPS.
    request_checksum_calculation: Literal["when_supported", "when_required"] = "when_supported"
    response_checksum_validation: Literal["when_supported", "when_required"] = "when_supported"
    multipart_threshold: ByteSize = field(default=ByteSize(16 * MiB), metadata={"check": _check_part_size})
    multipart_part_size: ByteSize = field(default=ByteSize(8 * MiB), metadata={"check": _check_part_size})
    multipart_concurrency: int = field(default=4, metadata={"check": positive})
    #: Attempts per request (the first included); botocore retries throttling, 5xx and connection errors.
    max_attempts: int = field(default=5, metadata={"check": positive})
    retry_mode: Literal["standard", "adaptive", "legacy"] = "standard"
    connect_timeout: Duration = field(default=Duration(10.0), metadata={"check": positive})
    read_timeout: Duration = field(default=Duration(60.0), metadata={"check": positive})
    max_pool_connections: int = field(default=32, metadata={"check": positive})

    def __post_init__(self) -> None:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ConfigError("storage.secret_access_key: access_key_id and secret_access_key go together")
        if self.access_key_id is not None and self.credentials_file is not None:
            raise ConfigError("storage.credentials_file: give either access keys or a credentials file, not both")


@dataclass(frozen=True)
class _Credentials:
    access_key_id: str
    secret_access_key: str
    session_token: str | None = None


def read_credentials_file(path: Path, profile: str | None) -> _Credentials:
    """The keys of ``profile`` (or ``default``) in an AWS shared-credentials file (blocking)."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as exc:
        raise StorageError(f"cannot read the S3 credentials file {path}", exc.strerror or str(exc)) from exc
    except configparser.Error as exc:
        raise StorageError(f"the S3 credentials file {path} is not in the AWS credentials format", str(exc)) from exc
    section = profile or "default"
    if not parser.has_section(section):
        raise StorageError(f"the S3 credentials file {path} has no [{section}] section")
    values = parser[section]
    key_id, secret = values.get("aws_access_key_id"), values.get("aws_secret_access_key")
    if not key_id or not secret:
        raise StorageError(
            f"the S3 credentials file {path}: [{section}] needs aws_access_key_id and aws_secret_access_key"
        )
    return _Credentials(key_id.strip(), secret.strip(), (values.get("aws_session_token") or "").strip() or None)


def _error_code(exc: ClientError) -> tuple[str, int]:
    error = exc.response.get("Error", {})
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return str(error.get("Code", "")), status


#: Storage keys (``list`` is also a method of the storage, which would shadow the type inside it).
Keys = list[str]


class S3Storage(Storage):
    """Objects in one S3 bucket, under an optional prefix."""

    kind = "s3"
    Options = S3Options

    def __init__(self, options: S3Options, *, data_dir: Path) -> None:
        super().__init__(options, data_dir=data_dir)
        self.options: S3Options = options
        self.bucket = options.bucket
        self.prefix = options.prefix
        self._root = f"{options.prefix}/" if options.prefix else ""
        self.endpoint = options.endpoint_url or "AWS S3"
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._checksums = options.request_checksum_calculation == "when_supported"

    # -- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the shared client, then check the endpoint, the credentials and the bucket."""
        stack = contextlib.AsyncExitStack()
        try:
            self._client = await stack.enter_async_context(await self._create_client())
            await self._check_bucket()
        except BaseException:
            self._client = None
            await stack.aclose()
            raise
        self._stack = stack

    async def close(self) -> None:
        stack, self._stack = self._stack, None
        self._client = None
        if stack is not None:
            await stack.aclose()

    async def _create_client(self) -> Any:
        options = self.options
        credentials: _Credentials | None = None
        if options.access_key_id is not None and options.secret_access_key is not None:
            credentials = _Credentials(options.access_key_id, options.secret_access_key, options.session_token)
        elif options.credentials_file is not None:
            credentials = await asyncio.to_thread(read_credentials_file, options.credentials_file, options.profile)

        def prepare() -> tuple[AioSession, str]:
            # Reading ~/.aws/config happens here, in a thread, not on the event loop.
            session = AioSession(profile=options.profile if credentials is None else None)
            session.register_component("data_loader", _shared_loader())
            region = options.region or session.get_config_variable("region") or "us-east-1"
            return session, str(region)

        try:
            session, region = await asyncio.to_thread(prepare)
        except ProfileNotFound as exc:
            raise StorageError(f"S3 profile {options.profile!r} is not configured", str(exc)) from exc
        verify: bool | str = options.verify_tls
        if options.verify_tls and options.ca_bundle is not None:
            if not await asyncio.to_thread(options.ca_bundle.is_file):
                raise StorageError(f"storage.ca_bundle: {options.ca_bundle} is not a readable file")
            verify = str(options.ca_bundle)
        config = AioConfig(
            region_name=region,
            retries={"total_max_attempts": options.max_attempts, "mode": options.retry_mode},
            connect_timeout=float(options.connect_timeout),
            read_timeout=float(options.read_timeout),
            max_pool_connections=options.max_pool_connections,
            s3={"addressing_style": options.addressing_style},
            request_checksum_calculation=options.request_checksum_calculation,
            response_checksum_validation=options.response_checksum_validation,
        )
        return session.create_client(
            "s3",
            endpoint_url=options.endpoint_url,
            region_name=region,
            verify=verify,
            aws_access_key_id=credentials.access_key_id if credentials else None,
            aws_secret_access_key=credentials.secret_access_key if credentials else None,
            aws_session_token=credentials.session_token if credentials else None,
            config=config,
        )

    async def _check_bucket(self) -> None:
        """HeadBucket, then a small write, with messages that say what is wrong."""
        where = f"S3 endpoint {self.endpoint}"
        try:
            await self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code, status = _error_code(exc)
            if status == 404 or code in ("NoSuchBucket", "404", "NotFound"):
                raise StorageError(f"bucket {self.bucket!r} does not exist on {where}") from None
            if status in (401, 403):
                raise await self._forbidden() from None
            if status == 301 or code in ("PermanentRedirect", "301"):
                raise StorageError(
                    f"bucket {self.bucket!r} is in another region than {self._client.meta.region_name!r}",
                    "set storage.region",
                ) from None
            raise StorageError(f"cannot check bucket {self.bucket!r} on {where}", f"{code}: {exc}") from None
        except SSLError as exc:
            raise StorageError(
                f"cannot reach endpoint {self.endpoint}: TLS verification failed",
                f"{exc} (set storage.ca_bundle to the CA that signed its certificate)",
            ) from None
        except _UNREACHABLE as exc:
            raise StorageError(f"cannot reach endpoint {self.endpoint}", str(exc)) from None
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise StorageError(
                "no S3 credentials found",
                f"{exc}; set storage.access_key_id and storage.secret_access_key, storage.credentials_file, "
                "or the AWS environment variables",
            ) from None
        except BotoCoreError as exc:
            raise StorageError(f"cannot check bucket {self.bucket!r} on {where}", str(exc)) from None
        # A key outside mwm's key grammar (leading dot), so it can never be one of mwm's objects.
        probe = f"{self._root}.mwm-probe/{uuid.uuid4().hex}"
        try:
            with self._errors("write probe", probe):
                await self._client.put_object(Bucket=self.bucket, Key=probe, Body=b"ok")
                await self._client.delete_object(Bucket=self.bucket, Key=probe)
        except StorageError as exc:
            raise StorageError(
                f"cannot write to and delete from bucket {self.bucket!r} on {where}: {exc.message}", exc.detail
            ) from None

    async def _forbidden(self) -> StorageError:
        """Tell wrong credentials from missing permissions (HeadBucket answers have no body)."""
        try:
            await self._client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
        except ClientError as exc:
            code, _status = _error_code(exc)
            if code in _BAD_CREDENTIALS:
                return StorageError(f"wrong credentials for S3 endpoint {self.endpoint}", f"{code}: {exc}")
            if code == "NoSuchBucket":
                return StorageError(f"bucket {self.bucket!r} does not exist on S3 endpoint {self.endpoint}")
            return StorageError(
                f"the S3 credentials have no access to bucket {self.bucket!r} (wrong credentials or missing "
                "permissions)",
                f"{code}: {exc}",
            )
        except BotoCoreError as exc:
            return StorageError(f"cannot check bucket {self.bucket!r} on S3 endpoint {self.endpoint}", str(exc))
        return StorageError(f"the S3 credentials may not read bucket {self.bucket!r} (HeadBucket was refused)")

    @property
    def client(self) -> Any:
        """The shared aiobotocore S3 client (``None`` unless open)."""
        return self._client

    @property
    def _s3(self) -> Any:
        if self._client is None:
            raise StorageError("S3 storage is not open")
        return self._client

    # -- keys and errors ------------------------------------------------------------------------

    def object_key(self, key: str) -> str:
        """The S3 key of the storage key ``key`` (with the prefix)."""
        return self._root + check_key(key)

    @contextlib.contextmanager
    def _errors(self, what: str, key: str) -> Iterator[None]:
        try:
            yield
        except ClientError as exc:
            self._raise_client_error(exc, what, key)
        except SSLError as exc:
            raise StorageError(f"cannot reach endpoint {self.endpoint}: TLS failure", f"{what} {key}: {exc}") from exc
        except _UNREACHABLE as exc:
            raise StorageError(f"cannot reach endpoint {self.endpoint}", f"{what} {key}: {exc}") from exc
        except ReadTimeoutError as exc:
            raise StorageError(f"S3 endpoint {self.endpoint} timed out", f"{what} {key}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError("S3 request failed", f"{what} {key}: {exc}") from exc

    def _raise_client_error(self, exc: ClientError, what: str, key: str) -> NoReturn:
        code, status = _error_code(exc)
        if code in _NOT_FOUND:
            raise StorageError("object not found", key) from None
        if code == "NoSuchBucket":
            raise StorageError(f"bucket {self.bucket!r} does not exist", f"{what} {key}") from None
        if code in _FULL:
            raise StorageFull("S3 storage is full", f"{what} {key}: {code}") from None
        if code in _BAD_CREDENTIALS:
            raise StorageError(f"wrong credentials for S3 endpoint {self.endpoint}", f"{what} {key}: {code}") from None
        raise StorageError(f"S3 {what} failed", f"{key}: {code or status}: {exc}") from None

    # -- writing --------------------------------------------------------------------------------

    async def put_bytes(self, key: str, data: bytes) -> None:
        full = self.object_key(key)
        with self._errors("write", key):
            await self._s3.put_object(Bucket=self.bucket, Key=full, Body=data)

    async def put_file(self, key: str, source: Path, *, move: bool = False) -> None:
        full = self.object_key(key)
        try:
            size = (await asyncio.to_thread(os.stat, source)).st_size
        except OSError as exc:
            raise StorageError("cannot read the file to store", f"{source}: {exc.strerror or exc}") from exc
        if size <= self.options.multipart_threshold:
            try:
                data = await asyncio.to_thread(source.read_bytes)
            except OSError as exc:
                raise StorageError("cannot read the file to store", f"{source}: {exc.strerror or exc}") from exc
            with self._errors("write", key):
                await self._s3.put_object(Bucket=self.bucket, Key=full, Body=data)
        else:
            await self._put_multipart(key, full, source, size)
        if move:
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(source.unlink)

    def _part_size(self, size: int) -> int:
        part = int(self.options.multipart_part_size)
        # Stay within S3's 10,000 parts for very large files.
        return max(part, -(-size // MAX_PARTS))

    async def _put_multipart(self, key: str, full: str, source: Path, size: int) -> None:
        extra = {"ChecksumAlgorithm": "CRC32"} if self._checksums else {}
        with self._errors("write", key):
            created = await self._s3.create_multipart_upload(Bucket=self.bucket, Key=full, **extra)
        upload_id = created["UploadId"]
        try:
            part_size = self._part_size(size)
            count = -(-size // part_size)
            parts: list[dict[str, Any]] = [{} for _ in range(count)]
            numbers = iter(range(count))
            fd = await asyncio.to_thread(os.open, source, os.O_RDONLY)
            try:

                async def worker() -> None:
                    for n in numbers:  # shared iterator: each part is taken by one worker
                        offset = n * part_size
                        data = await asyncio.to_thread(os.pread, fd, min(part_size, size - offset), offset)
                        with self._errors("write", key):
                            answer = await self._s3.upload_part(
                                Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=n + 1, Body=data
                            )
                        part = {"PartNumber": n + 1, "ETag": answer["ETag"]}
                        if "ChecksumCRC32" in answer:
                            part["ChecksumCRC32"] = answer["ChecksumCRC32"]
                        parts[n] = part

                async with asyncio.TaskGroup() as tg:
                    for _ in range(min(self.options.multipart_concurrency, count)):
                        tg.create_task(worker())
            finally:
                await asyncio.to_thread(os.close, fd)
            with self._errors("write", key):
                await self._s3.complete_multipart_upload(
                    Bucket=self.bucket, Key=full, UploadId=upload_id, MultipartUpload={"Parts": parts}
                )
        except BaseException as exc:
            await asyncio.shield(self._abort(full, upload_id))
            # A failed part surfaces as a group from the task group: report its own error.
            error = exc.exceptions[0] if isinstance(exc, BaseExceptionGroup) else exc
            if isinstance(error, OSError):
                raise StorageError("cannot read the file to store", f"{source}: {error.strerror or error}") from error
            if error is not exc:
                raise error from None
            raise

    async def _abort(self, full: str, upload_id: str) -> None:
        try:
            await self._s3.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
        except (BotoCoreError, ClientError) as exc:
            log.warning("cannot abort the multipart upload of %s: %s", full, exc)

    # -- reading --------------------------------------------------------------------------------

    async def get_bytes(self, key: str) -> bytes:
        full = self.object_key(key)
        with self._errors("read", key):
            answer = await self._s3.get_object(Bucket=self.bucket, Key=full)
            async with answer["Body"] as body:
                data: bytes = await body.read()
        return data

    async def _chunks(self, full: str, key: str, chunk_size: int) -> AsyncGenerator[bytes, None]:
        with self._errors("read", key):
            answer = await self._s3.get_object(Bucket=self.bucket, Key=full)
        body = answer["Body"]
        try:
            with self._errors("read", key):
                async for chunk in body.iter_chunks(chunk_size):
                    yield chunk
        finally:
            body.close()

    async def stream(self, key: str, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        async with contextlib.aclosing(self._chunks(self.object_key(key), key, chunk_size)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def fetch(self, key: str, dest: Path) -> None:
        await self._download(self.object_key(key), key, dest)

    async def fetch_listed(self, key: str, dest: Path) -> None:
        """Like ``fetch``, for a key that ``list`` returned.

        Objects written by others (an application's outputs uploaded by Argo) may have names
        outside mwm's key grammar; such a key is only ever used as an S3 key here, never as a
        local path (``dest`` is the caller's).
        """
        if not key or len(key) > MAX_KEY_LENGTH:
            raise StorageError("invalid storage key", repr(key[:80]))
        await self._download(self._root + key, key, dest)

    async def _download(self, full: str, key: str, dest: Path) -> None:
        temp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")

        def create() -> Any:
            dest.parent.mkdir(parents=True, exist_ok=True)
            return open(temp, "wb")

        try:
            f = await asyncio.to_thread(create)
        except OSError as exc:
            raise StorageError("cannot write the fetched object", f"{dest}: {exc.strerror or exc}") from exc
        try:
            try:
                async with contextlib.aclosing(self._chunks(full, key, 1 << 20)) as chunks:
                    async for chunk in chunks:
                        await asyncio.to_thread(f.write, chunk)
            finally:
                await asyncio.to_thread(f.close)
            await asyncio.to_thread(os.replace, temp, dest)
        except BaseException as exc:
            await asyncio.shield(asyncio.to_thread(_unlink_quietly, temp))
            if isinstance(exc, OSError):
                raise StorageError("cannot write the fetched object", f"{dest}: {exc.strerror or exc}") from exc
            raise

    async def exists(self, key: str) -> bool:
        full = self.object_key(key)
        try:
            with self._errors("check", key):
                await self._s3.head_object(Bucket=self.bucket, Key=full)
        except StorageError as exc:
            if exc.message == "object not found":
                return False
            raise
        return True

    async def size(self, key: str) -> int:
        full = self.object_key(key)
        with self._errors("check", key):
            answer = await self._s3.head_object(Bucket=self.bucket, Key=full)
        return int(answer["ContentLength"])

    async def list(self, prefix: str) -> list[str]:
        base = check_key(prefix.rstrip("/"))
        keys = await self._list_under(base)
        if not keys and await self.exists(base):
            return [base]
        return keys

    async def _list_under(self, base: str) -> Keys:
        """Keys strictly under ``base/`` (S3 lists them in key order), with pagination."""
        keys: Keys = []
        with self._errors("list", base):
            paginator = self._s3.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self._root}{base}/"):
                keys.extend(item["Key"][len(self._root) :] for item in page.get("Contents", ()))
        return sorted(keys)

    # -- removing and copying -------------------------------------------------------------------

    async def delete(self, key: str) -> None:
        full = self.object_key(key)
        with self._errors("delete", key):
            await self._s3.delete_object(Bucket=self.bucket, Key=full)

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix/``; returns how many there were.

        Objects are deleted one by one (a few at a time) rather than with DeleteObjects, whose
        checksum requirements some S3-compatible servers handle differently.
        """
        keys = await self._list_under(check_key(prefix.rstrip("/")))
        semaphore = asyncio.Semaphore(DELETE_CONCURRENCY)

        async def one(key: str) -> None:
            async with semaphore:
                with self._errors("delete", key):
                    await self._s3.delete_object(Bucket=self.bucket, Key=self._root + key)

        async with asyncio.TaskGroup() as tg:
            for key in keys:
                tg.create_task(one(key))
        return len(keys)

    async def copy(self, src_key: str, dst_key: str) -> None:
        """Server-side copy: the bytes never travel through mwm."""
        src, dst = self.object_key(src_key), self.object_key(dst_key)
        with self._errors("copy", src_key):
            try:
                await self._s3.copy_object(Bucket=self.bucket, Key=dst, CopySource={"Bucket": self.bucket, "Key": src})
            except ClientError as exc:
                code, _status = _error_code(exc)
                if code not in ("InvalidRequest", "EntityTooLarge") or "size" not in str(exc).lower():
                    raise
                await self._copy_multipart(src, dst)  # CopyObject stops at 5 GiB

    async def _copy_multipart(self, src: str, dst: str) -> None:
        """Copy an object over 5 GiB with UploadPartCopy."""
        head = await self._s3.head_object(Bucket=self.bucket, Key=src)
        size = int(head["ContentLength"])
        created = await self._s3.create_multipart_upload(Bucket=self.bucket, Key=dst)
        upload_id = created["UploadId"]
        try:
            parts = []
            for n, start in enumerate(range(0, size, COPY_PART_SIZE), 1):
                end = min(size, start + COPY_PART_SIZE) - 1
                answer = await self._s3.upload_part_copy(
                    Bucket=self.bucket,
                    Key=dst,
                    UploadId=upload_id,
                    PartNumber=n,
                    CopySource={"Bucket": self.bucket, "Key": src},
                    CopySourceRange=f"bytes={start}-{end}",
                )
                parts.append({"PartNumber": n, "ETag": answer["CopyPartResult"]["ETag"]})
            await self._s3.complete_multipart_upload(
                Bucket=self.bucket, Key=dst, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            await asyncio.shield(self._abort(dst, upload_id))
            raise

    def describe(self) -> Mapping[str, Any]:
        return {"kind": self.kind, "endpoint": self.endpoint, "bucket": self.bucket, "prefix": self.prefix}


@functools.cache
def _shared_loader() -> Any:
    """One botocore model loader for the process, its S3 models read once (called in a thread).

    The loader caches what it reads, so creating a client later reads no file on the event loop.
    """
    loader = botocore.loaders.create_loader()
    loader.load_service_model("s3", "service-2")
    for type_name in ("endpoint-rule-set-1", "paginators-1", "waiters-2"):
        with contextlib.suppress(botocore.exceptions.DataNotFoundError):
            loader.load_service_model("s3", type_name)
    for name in ("_retry", "endpoints", "partitions", "sdk-default-configuration"):
        with contextlib.suppress(botocore.exceptions.DataNotFoundError):
            loader.load_data(name)
    return loader


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
