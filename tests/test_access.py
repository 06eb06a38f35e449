"""Access control: bearer tokens with roles on every route, loopback-only without tokens, TLS."""

from __future__ import annotations

import datetime
import ipaddress
import re
import ssl

import aiohttp
import pytest
from support import base_config

from mwm.api import PUBLIC_PATHS, routes
from mwm.config import settings_from_mapping
from mwm.errors import ConfigError
from mwm.service import Service

READ = "read-token-0123456789"
ADMIN = "admin-token-0123456789"


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", path)


ROUTES = [(r.method, r.path) for r in routes() if r.method != "HEAD"]


@pytest.fixture
async def secured(tmp_path, make_service):
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"# role token\nread {READ}\n")
    config = base_config(
        tmp_path, server={"tokens": [{"token": ADMIN, "role": "admin"}], "tokens_file": str(tokens_file)}
    )
    service = await make_service(config)
    async with aiohttp.ClientSession() as session:
        yield f"http://127.0.0.1:{service.http_port}", session


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_every_route_checks_the_token(secured, method, path) -> None:
    base, session = secured
    url = base + concrete(path)

    async def status(token: str | None) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with session.request(method, url, headers=headers, data=b"{}") as response:
            if path == "/v1/events/stream" and response.status == 200:
                return 200  # a stream: the answer is enough
            await response.read()
            return response.status

    if path in PUBLIC_PATHS:
        assert await status(None) not in (401, 403)
        return
    assert await status(None) == 401
    assert await status("wrong-token-0123456789") == 401
    read_status = await status(READ)
    admin_status = await status(ADMIN)
    if method == "GET":
        assert read_status not in (401, 403) and admin_status not in (401, 403)
    else:
        assert read_status == 403, f"{method} {path} must need an admin token"
        assert admin_status not in (401, 403)


async def test_whoami_tells_the_role(secured) -> None:
    base, session = secured
    for token, role in ((READ, "read"), (ADMIN, "admin")):
        async with session.get(base + "/v1/whoami", headers={"Authorization": f"Bearer {token}"}) as response:
            assert (await response.json()) == {"role": role}


async def test_a_401_names_the_scheme(secured) -> None:
    base, session = secured
    async with session.get(base + "/v1/jobs") as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await response.json())["error"] == "unauthorized"


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "[::]"])
async def test_no_public_address_without_tokens(tmp_path, host) -> None:
    settings = settings_from_mapping(base_config(tmp_path, server={"http": f"{host}:0"}))
    with pytest.raises(ConfigError, match="not a loopback address, without tokens"):
        await Service(settings).start()


def test_short_tokens_are_refused(tmp_path) -> None:
    from mwm.config import read_tokens

    settings = settings_from_mapping(base_config(tmp_path, server={"tokens": [{"token": "short"}]}))
    with pytest.raises(ConfigError, match="at least 16 characters"):
        read_tokens(settings.server)


def make_certificate(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mwm test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


async def test_https(tmp_path, make_service) -> None:
    cert, key = make_certificate(tmp_path)
    service = await make_service(base_config(tmp_path, server={"tls_cert": str(cert), "tls_key": str(key)}))
    context = ssl.create_default_context(cafile=str(cert))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"https://127.0.0.1:{service.http_port}/health", ssl=context) as response:
            assert response.status == 200 and (await response.json())["status"] == "ok"
        with pytest.raises(aiohttp.ClientError):
            async with session.get(f"http://127.0.0.1:{service.http_port}/health") as response:
                await response.read()
