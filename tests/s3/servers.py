"""An S3 test server: ``moto_server`` on an ephemeral port, over HTTP or HTTPS, with real credentials.

moto is started with IAM authentication on (after the first requests, which create a user, its
access key and a policy), so a wrong key is refused as a real S3 refuses it. The HTTPS server
uses a self-signed certificate made here, for 127.0.0.1.
"""

from __future__ import annotations

import datetime
import importlib.util
import ipaddress
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

MOTO_SERVER = Path(sys.executable).parent / "moto_server"
NEEDED = ("aiobotocore", "botocore", "cryptography", "moto")
#: Requests moto answers without authentication: the three IAM calls that create our user.
SETUP_REQUESTS = 3
_RUNNING = re.compile(r"Running on (https?://127\.0\.0\.1:\d+)")


def require_s3_packages() -> None:
    """Skip the calling test when the S3 packages (the ``s3`` and ``test`` extras) are not installed."""
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing or not MOTO_SERVER.exists():
        pytest.skip(f"S3 tests need {', '.join(missing or ['moto_server'])} (pip install -e '.[test,s3]')")


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate (also its own CA) for 127.0.0.1 and localhost; returns (cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mwm test server")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "server.crt", folder / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@dataclass
class MotoServer:
    """A running ``moto_server`` and the credentials it accepts."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    access_key_id: str = ""
    secret_access_key: str = ""
    ca_bundle: Path | None = None
    _client: Any = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        """``host:port``, as an Argo artifact repository names it."""
        return self.url.split("://", 1)[1]

    @property
    def tls(self) -> bool:
        return self.url.startswith("https://")

    def client(self, service: str = "s3", *, key: str | None = None, secret: str | None = None) -> Any:
        """A synchronous botocore client (for test set-up, outside the event loop)."""
        import botocore.session

        return botocore.session.get_session().create_client(
            service,
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=key or self.access_key_id or "setup",
            aws_secret_access_key=secret or self.secret_access_key or "setup",
            verify=str(self.ca_bundle) if self.ca_bundle else None,
        )

    def new_bucket(self, name: str | None = None) -> str:
        """Create a bucket with a fresh name (or ``name``) and return its name."""
        name = name or f"mwm-{uuid.uuid4().hex[:16]}"
        if self._client is None:
            self._client = self.client()
        self._client.create_bucket(Bucket=name)
        return name

    def storage_options(self, bucket: str, **extra: Any) -> dict[str, Any]:
        """A ``[storage]`` table for this server."""
        options: dict[str, Any] = {
            "kind": "s3",
            "endpoint_url": self.url,
            "bucket": bucket,
            "region": "us-east-1",
            "addressing_style": "path",
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
        }
        if self.ca_bundle is not None:
            options["ca_bundle"] = str(self.ca_bundle)
        options.update(extra)
        return options

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        if self._client is None:
            self._client = self.client()
        paginator = self._client.get_paginator("list_objects_v2")
        return [o["Key"] for page in paginator.paginate(Bucket=bucket, Prefix=prefix) for o in page.get("Contents", [])]

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_moto(folder: Path, *, tls: bool = False) -> MotoServer:
    """Start ``moto_server`` on 127.0.0.1 with a free port and create a user with full access."""
    folder.mkdir(parents=True, exist_ok=True)
    argv = [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", "0"]
    ca_bundle = None
    if tls:
        ca_bundle, key = make_certificate(folder)
        argv += ["-c", str(ca_bundle), "-k", str(key)]
    log_path = folder / "moto.log"
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_REQUESTS)}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        env.pop(name, None)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 20
    url = None
    while url is None:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited with {process.returncode}: {log_path.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"moto_server did not start: {log_path.read_text()[-2000:]}")
        match = _RUNNING.search(log_path.read_text(errors="replace"))
        if match:
            url = match.group(1)
        else:
            time.sleep(0.05)
    server = MotoServer(url=url, process=process, log_path=log_path, ca_bundle=ca_bundle)
    try:
        iam = server.client("iam")
        iam.create_user(UserName="mwm")
        access = iam.create_access_key(UserName="mwm")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="mwm", PolicyName="everything", PolicyDocument=json.dumps(policy))
        iam.close()
    except BaseException:
        server.stop()
        raise
    server.access_key_id = access["AccessKeyId"]
    server.secret_access_key = access["SecretAccessKey"]
    return server


@pytest.fixture(scope="session")
def moto_http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """An S3 server over plain HTTP, for the whole session."""
    require_s3_packages()
    server = start_moto(tmp_path_factory.mktemp("moto-http"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto_https(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """An S3 server over HTTPS with a self-signed certificate (``ca_bundle`` trusts it)."""
    require_s3_packages()
    server = start_moto(tmp_path_factory.mktemp("moto-https"), tls=True)
    yield server
    server.stop()
