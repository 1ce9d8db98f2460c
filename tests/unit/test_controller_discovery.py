"""The shipped discovery document agrees with the real Arvados one, and the routes with it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from dispatcher.arvados.controller import discovery
from dispatcher.arvados.controller.app import HANDLERS, build_app, exported_config
from dispatcher.arvados.controller.store import Policy, Store
from dispatcher.arvados.controller.tls import ensure_dev_certs
from dispatcher.config import parse_config
from tests.helpers.paths import REFERENCE_DIR

REFERENCE = REFERENCE_DIR / "arvados-v1-discovery.json"


@pytest.fixture(scope="module")
def reference() -> dict:
    if not REFERENCE.exists():
        pytest.skip(f"{REFERENCE} not available")
    return json.loads(REFERENCE.read_text())


def test_every_served_method_matches_reference(reference: dict) -> None:
    served = discovery.served_methods()
    assert len(served) == sum(len(m) for m in discovery.SERVED.values())
    for res, name, http_method, path in served:
        ref = reference["resources"][res]["methods"][name]
        assert (ref["httpMethod"], ref["path"]) == (http_method, path), f"{res}.{name}"
        shipped = discovery._packaged()["resources"][res]["methods"][name]
        assert shipped["id"] == ref["id"]
        assert shipped["parameters"].keys() == ref["parameters"].keys()


def test_packaged_document_is_the_trimmed_reference(reference: dict) -> None:
    assert discovery._packaged() == json.loads(json.dumps(discovery.trim_reference(reference)))


def test_handlers_cover_exactly_the_served_methods() -> None:
    assert set(HANDLERS) == {(res, name) for res, name, _, _ in discovery.served_methods()}


def test_document_for_host() -> None:
    doc = discovery.discovery_document("127.0.0.1:8443", cluster_id="zzzzz", max_request_size=5)
    assert doc["rootUrl"] == "https://127.0.0.1:8443/"
    assert doc["servicePath"] == "arvados/v1/"
    assert doc["baseUrl"] == "https://127.0.0.1:8443/arvados/v1/"
    assert doc["uuidPrefix"] == "zzzzz" and doc["maxRequestSize"] == 5
    assert "collections" not in doc["resources"]


def test_routes_registered(tmp_path: Path) -> None:
    cfg = parse_config({"Clusters": {"zzzzz": {"SystemRootToken": "x" * 20}}})
    store = Store(tmp_path / "db", Policy.from_config(cfg))
    try:
        extra_calls: list[web.Application] = []
        app = build_app(cfg, store, [extra_calls.append])
        assert extra_calls == [app]
        paths = {r.resource.canonical for r in app.router.routes() if r.resource is not None}
        for _, _, _, path in discovery.served_methods():
            assert "/arvados/v1/" + path in paths
        assert "/discovery/v1/apis/arvados/v1/rest" in paths
        assert "/_health/ping" in paths and "/metrics" in paths
    finally:
        store.close()


def test_exported_config_has_no_secrets() -> None:
    cfg = parse_config({"Clusters": {"zzzzz": {
        "SystemRootToken": "secret-root-token-value",
        "ManagementToken": "secret-management-value",
        "Containers": {"DispatchPrivateKey": "secret-private-key",
                       "CloudVMs": {"DriverParameters": {"SecretAccessKey": "secret-aws-key"}}},
        "TLS": {"Key": "/secret/key/path"},
        "PostgreSQL": {"Connection": {"password": "secret-db-password"}},
        "Services": {"Controller": {"ExternalURL": "https://ctl.example:443"}},
    }}})
    text = json.dumps(exported_config(cfg))
    assert "secret" not in text
    exported = exported_config(cfg)
    assert exported["ClusterID"] == "zzzzz"
    assert exported["Services"]["Controller"]["ExternalURL"] == "https://ctl.example:443"
    assert exported["Containers"]["MaxDispatchAttempts"] == 10
    assert exported["StorageClasses"]["default"]["Default"] is True


def test_dev_certs_are_reused_and_extended(tmp_path: Path) -> None:
    import ssl

    from cryptography import x509

    first = ensure_dev_certs(tmp_path, ["127.0.0.1"])
    ca_bytes, cert_bytes = first.ca_cert.read_bytes(), first.cert.read_bytes()
    again = ensure_dev_certs(tmp_path, ["127.0.0.1"])
    assert again == first and again.cert.read_bytes() == cert_bytes
    assert (first.key.stat().st_mode & 0o777) == 0o600
    wider = ensure_dev_certs(tmp_path, ["ctl.example"])
    assert wider.ca_cert.read_bytes() == ca_bytes  # the CA stays: clients keep trusting it
    cert = x509.load_pem_x509_certificate(wider.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "ctl.example" in san.get_values_for_type(x509.DNSName)
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    # The server certificate verifies against the CA.
    ctx = ssl.create_default_context(cafile=str(wider.ca_cert))
    ctx.load_cert_chain(str(wider.cert), str(wider.key))


def _handshake(server_ctx: Any, client_ctx: Any, server_hostname: str) -> None:
    """A TLS handshake in memory; raises ssl.SSLCertVerificationError on a name mismatch."""
    import ssl

    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, obj in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


def test_dev_certificate_covers_container_web_services(tmp_path: Path) -> None:
    import ssl

    from dispatcher.arvados.controller.cli import certificate_names

    cfg = parse_config({"Clusters": {"zzzzz": {"Services": {
        "Controller": {"ExternalURL": "https://ctl.localhost:8443",
                       "InternalURLs": {"https://127.0.0.1:8443": {}}},
        "ContainerWebServices": {"ExternalURL": "https://*.containers.localhost:9443"},
    }}}})
    names = certificate_names(cfg, "127.0.0.1")
    assert names == ["127.0.0.1", "ctl.localhost", "*.containers.localhost"]
    paths = ensure_dev_certs(tmp_path, names)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(str(paths.cert), str(paths.key))
    client = ssl.create_default_context(cafile=str(paths.ca_cert))
    _handshake(server, client, "zzzzz-dz642-000000000000001-8080.containers.localhost")
    _handshake(server, client, "ctl.localhost")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server, client, "elsewhere.localhost")
