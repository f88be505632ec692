"""The OpenAPI document of the tenant API: valid OpenAPI 3.1, in step with the server's route table, and
true of the live server (schemathesis fuzzes every operation over real HTTPS on loopback)."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from cmcd.api.server import OPENAPI_PATH, ApiServer
from tests.conftest import Cmcd

API_DIR = Path(__file__).resolve().parents[2] / "cmcd" / "api"
METHODS = {"get", "post", "put", "patch", "delete"}
#: per operation; POST /v1/sessions hashes a password (~100 ms) per example, so it gets few
MAX_EXAMPLES = 20
SESSION_EXAMPLES = 5


def _document() -> dict[str, Any]:
    return json.loads(OPENAPI_PATH.read_text())


def _documented() -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, item in _document()["paths"].items() for m in item if m in METHODS}


def test_document_is_valid_openapi_31() -> None:
    doc = _document()
    validate(doc, cls=OpenAPIV31SpecValidator)
    assert doc["openapi"] == "3.1.0" and doc["info"]["title"] == "cmcd tenant API"
    assert OPENAPI_PATH.read_text() == json.dumps(doc, indent=2, ensure_ascii=False) + "\n", "keep it 2-space indented"


def test_every_route_is_documented_and_every_path_is_a_route() -> None:
    """The application's router (built without starting anything) against the document's paths."""
    server = object.__new__(ApiServer)  # app() needs only the request-size limit
    server.config = SimpleNamespace(api=SimpleNamespace(max_request_size=1024))  # type: ignore[assignment]
    routes = {
        (r.method, r.resource.canonical)
        for r in server.app().router.routes()
        if r.method != "HEAD"
        and r.resource is not None  # aiohttp adds HEAD to every GET
        and r.resource.canonical.startswith("/v1/")  # the console's HTML pages are no API
    }
    assert routes == _documented()


def test_route_table_in_source_matches_too() -> None:
    """The same from the source text of cmcd/api/: its `add_<method>("/v1/...", ...)` calls."""
    calls = {
        (node.func.attr.removeprefix("add_").upper(), node.args[0].value)
        for source in sorted(API_DIR.glob("*.py"))
        for node in ast.walk(ast.parse(source.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr.removeprefix("add_") in METHODS
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and str(node.args[0].value).startswith("/v1/")
    }
    assert calls == _documented()


# -- the live server under schemathesis ------------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, ca: Any) -> Any:
    """One daemon with the API on and delivery off (accepted messages stay queued), an admin API key
    of acme (send, read, manage), and the test CA as a PEM file for the client. The login throttle is
    off: fuzzed bad logins and tokens must not turn every later request into 429."""
    root = tmp_path_factory.mktemp("openapi")
    d = Cmcd(root, ca, {"api": {"listen": "127.0.0.1:0"}, "smtp": {"auth_fail_limit": 0}})
    d.start().provision()
    d.admin("user.add", tenant="acme", login="acme-admin", role="admin", password="pw-acme-admin")
    key = str(d.admin("apikey.add", tenant="acme", login="acme-admin")["token"])
    ca_pem = root / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    yield d, key, str(ca_pem)
    d.stop()


SCHEMA = schemathesis.openapi.from_path(
    OPENAPI_PATH,
    config=schemathesis.Config.from_dict(
        {
            "phases": {"stateful": {"enabled": False}},
            "generation": {"mode": "all", "deterministic": True, "database": "none"},
        }
    ),
)
CHECKS = [
    schemathesis.checks.not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
FUZZ = settings(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def _call(case: schemathesis.Case, live: Any) -> None:
    d, key, ca_pem = live
    case.call_and_validate(
        base_url=f"https://127.0.0.1:{d.api_port}",
        headers={"Authorization": f"Bearer {key}"},
        verify=ca_pem,
        timeout=60,
        checks=CHECKS,
    )


@SCHEMA.exclude(path="/v1/sessions").parametrize()
@settings(FUZZ, max_examples=MAX_EXAMPLES)
def test_live_server_conforms(case: schemathesis.Case, live: Any) -> None:
    _call(case, live)


@SCHEMA.include(path="/v1/sessions").parametrize()
@settings(FUZZ, max_examples=SESSION_EXAMPLES)
def test_live_sessions_conform(case: schemathesis.Case, live: Any) -> None:
    """Few examples: every one checks a password (scrypt, ~100 ms)."""
    _call(case, live)


#: inputs the generator rarely makes, each of which once got a 500: a digit that is not ASCII, a
#: cursor past SQLite's INTEGER range, and lone UTF-16 surrogate escapes (valid JSON, not encodable)
EDGES = [
    pytest.param("GET", "/v1/deliveries", {"query": {"limit": "\u00b2"}}, id="limit-superscript-two"),
    pytest.param("GET", "/v1/blocks", {"query": {"limit": "\u00b2"}}, id="blocks-limit-superscript-two"),
    pytest.param(
        "GET",
        "/v1/deliveries",
        {"query": {"cursor": "Yzk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk"}},
        id="cursor-beyond-int64",
    ),  # fmt: skip
    pytest.param(
        "POST",
        "/v1/emails",
        {"body": {"from": "alice@acme.test", "to": ["x@dst.test"], "subject": "\ud800", "text": "t"}},
        id="email-lone-surrogate",
    ),  # fmt: skip
    pytest.param(
        "POST",
        "/v1/emails/bulk",
        {
            "body": {
                "from": "alice@acme.test",
                "subject": "{{a}}",
                "text": "t",
                "recipients": [{"to": "x@dst.test", "merge": {"a": "\udfff"}}],
            }
        },
        id="bulk-lone-surrogate",
    ),  # fmt: skip
    pytest.param(
        "POST",
        "/v1/sessions",
        {"body": {"login": "alice", "password": "\ud800", "otp": "123456"}},
        id="session-lone-surrogate",
    ),  # fmt: skip
    pytest.param(
        "POST",
        "/v1/users",
        {"body": {"login": "surrogate", "password": "twelve chars \ud800"}},
        id="user-lone-surrogate",
    ),  # fmt: skip
    pytest.param(
        "POST", "/v1/blocks", {"body": {"address": "a@b.test", "reason": "\ud800"}}, id="block-lone-surrogate"
    ),
]


@pytest.mark.parametrize(("method", "path", "data"), EDGES)
def test_edge_inputs_conform(live: Any, method: str, path: str, data: dict[str, Any]) -> None:
    case = SCHEMA[path][method].Case(**data)
    _call(case, live)
