"""The gateway's HTTP policy: CORS (origins, preflight, headers, credentials) and the allowed-Host list."""

from __future__ import annotations

import pytest

from deployments.gateway.http_policy import CorsPolicy, HostPolicy, HttpPolicy
from deployments.messages import ServeError

APP = "https://app.example.com"


def preflight_headers(origin: str, method: str = "POST", req_headers: str | None = None) -> dict[str, str]:
    headers = {"origin": origin, "access-control-request-method": method}
    if req_headers is not None:
        headers["access-control-request-headers"] = req_headers
    return headers


def cors(*origins: str, **kw) -> HttpPolicy:
    return HttpPolicy(CorsPolicy(allow_origins=origins, **kw))


# --- CORS off -------------------------------------------------------------------------------------------------


def test_cors_off_by_default_sends_nothing_and_answers_no_preflight():
    policy = HttpPolicy()
    assert policy.response_headers({"origin": APP}) == {}
    assert policy.preflight("OPTIONS", preflight_headers(APP, "POST", "authorization")) is None


def test_not_a_preflight_is_left_to_the_caller():
    policy = cors(APP)
    assert policy.preflight("OPTIONS", {"origin": APP}) is None  # no Access-Control-Request-Method
    assert policy.preflight("OPTIONS", {"access-control-request-method": "POST"}) is None  # no Origin
    assert policy.preflight("POST", preflight_headers(APP)) is None
    assert policy.preflight("OPTIONS", {}) is None


def test_no_origin_no_headers():
    assert cors(APP).response_headers({"host": "api.example.com"}) == {}


# --- exact origins --------------------------------------------------------------------------------------------


def test_allowed_exact_origin_actual_response():
    out = cors(APP).response_headers({"origin": APP})
    assert out["Access-Control-Allow-Origin"] == APP
    assert out["Vary"] == "Origin"
    exposed = out["Access-Control-Expose-Headers"].split(", ")
    assert "x-request-id" in exposed and "retry-after" in exposed and "x-ratelimit-remaining-tokens" in exposed
    assert "Access-Control-Allow-Credentials" not in out


def test_disallowed_origin_gets_nothing():
    policy = cors(APP)
    assert policy.response_headers({"origin": "https://evil.example.net"}) == {}
    assert policy.response_headers({"origin": "http://app.example.com"}) == {}  # another scheme: another origin
    assert policy.response_headers({"origin": "https://app.example.com:8443"}) == {}  # another port
    assert policy.response_headers({"origin": "null"}) == {}
    assert policy.response_headers({"origin": "garbage"}) == {}


def test_origin_case_and_default_port_normalised():
    policy = cors("HTTPS://App.Example.com:443", "http://localhost:3000")
    assert policy.response_headers({"origin": APP})["Access-Control-Allow-Origin"] == APP
    # the request's own spelling is echoed, that is what the browser compares
    assert policy.response_headers({"origin": "https://APP.example.com"})["Access-Control-Allow-Origin"] == (
        "https://APP.example.com")
    assert policy.response_headers({"origin": "http://localhost:3000"})["Access-Control-Allow-Origin"] == (
        "http://localhost:3000")
    assert policy.response_headers({"origin": "http://localhost:3001"}) == {}
    assert cors("http://a.test").response_headers({"origin": "http://a.test:80"}) != {}


def test_ipv6_origin():
    policy = cors("http://[::1]:5173")
    assert policy.response_headers({"origin": "http://[0:0:0:0:0:0:0:1]:5173"}) != {}
    assert policy.response_headers({"origin": "http://[::2]:5173"}) == {}


# --- wildcard subdomains --------------------------------------------------------------------------------------


def test_wildcard_subdomain():
    policy = cors("https://*.example.com")
    assert policy.response_headers({"origin": APP})["Access-Control-Allow-Origin"] == APP
    assert policy.response_headers({"origin": "https://a.b.example.com"}) != {}
    for origin in ("https://evil-example.com", "https://example.com.evil.net", "https://example.com",
                   "http://app.example.com", "https://app.example.com:8443", "https://*.example.com",
                   "https://appexample.com"):
        assert policy.response_headers({"origin": origin}) == {}, origin
        assert policy.preflight("OPTIONS", preflight_headers(origin)) == (403, {"Vary": "Origin"}), origin


def test_wildcard_subdomain_with_port():
    policy = cors("http://*.local.test:8080")
    assert policy.response_headers({"origin": "http://ui.local.test:8080"}) != {}
    assert policy.response_headers({"origin": "http://ui.local.test"}) == {}


# --- "*" ------------------------------------------------------------------------------------------------------


def test_any_origin_sends_star_without_vary():
    policy = cors("*")
    out = policy.response_headers({"origin": "https://anything.test"})
    assert out["Access-Control-Allow-Origin"] == "*"
    assert "Vary" not in out
    assert policy.response_headers({"origin": "null"})["Access-Control-Allow-Origin"] == "*"
    status, headers = policy.preflight("OPTIONS", preflight_headers("https://x.test", "POST", "content-type"))
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "*"


# --- preflight ------------------------------------------------------------------------------------------------


def test_allowed_preflight():
    status, headers = cors(APP).preflight("OPTIONS", preflight_headers(APP, "POST", "Authorization, Content-Type"))
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == APP
    assert headers["Vary"] == "Origin"
    assert headers["Access-Control-Allow-Methods"] == "GET, POST, HEAD, OPTIONS"
    assert headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    assert headers["Access-Control-Max-Age"] == "600"
    assert "Access-Control-Allow-Credentials" not in headers


def test_preflight_without_requested_headers_and_lower_case_method():
    status, headers = cors(APP, max_age_s=30).preflight("options", preflight_headers(APP, "get"))
    assert status == 204
    assert "Access-Control-Allow-Headers" not in headers
    assert headers["Access-Control-Max-Age"] == "30"


@pytest.mark.parametrize("method", ["DELETE", "PUT", "PATCH"])
def test_refused_preflight_for_a_disallowed_method(method):
    assert cors(APP).preflight("OPTIONS", preflight_headers(APP, method)) == (403, {"Vary": "Origin"})


@pytest.mark.parametrize("req_headers", ["x-evil", "authorization, x-evil", "x-stainless", "cookie"])
def test_refused_preflight_for_a_disallowed_header(req_headers):
    assert cors(APP).preflight("OPTIONS", preflight_headers(APP, "POST", req_headers)) == (403, {"Vary": "Origin"})


def test_refused_preflight_for_a_disallowed_origin():
    status, headers = cors(APP).preflight("OPTIONS", preflight_headers("https://evil.test"))
    assert status == 403 and headers == {"Vary": "Origin"}


def test_openai_js_client_headers():
    # what openai-node sends from a browser (dangerouslyAllowBrowser)
    sent = ("authorization, content-type, x-stainless-arch, x-stainless-lang, x-stainless-os, "
            "x-stainless-package-version, x-stainless-retry-count, x-stainless-runtime, "
            "x-stainless-runtime-version, x-stainless-timeout, openai-organization, openai-project")
    status, headers = cors(APP).preflight("OPTIONS", preflight_headers(APP, "POST", sent))
    assert status == 204
    assert "x-stainless-retry-count" in headers["Access-Control-Allow-Headers"].split(", ")
    assert "x-stainless-*" not in headers["Access-Control-Allow-Headers"]  # a pattern means nothing to a browser


def test_custom_headers_and_methods_case_insensitive():
    policy = cors(APP, allow_methods=("post", "DELETE"), allow_headers=("X-Custom", "X-Pre-*"))
    assert policy.preflight("OPTIONS", preflight_headers(APP, "DELETE", "x-custom,X-PRE-thing"))[0] == 204
    assert policy.preflight("OPTIONS", preflight_headers(APP, "POST", "authorization"))[0] == 403
    assert policy.preflight("OPTIONS", preflight_headers(APP, "GET"))[0] == 403


def test_any_header():
    policy = cors(APP, allow_headers=("*",))
    status, headers = policy.preflight("OPTIONS", preflight_headers(APP, "POST", "x-whatever"))
    assert status == 204 and headers["Access-Control-Allow-Headers"] == "x-whatever"


# --- credentials ----------------------------------------------------------------------------------------------


def test_credentials_flag():
    policy = cors(APP, allow_credentials=True)
    out = policy.response_headers({"origin": APP})
    assert out["Access-Control-Allow-Credentials"] == "true"
    assert out["Access-Control-Allow-Origin"] == APP
    status, headers = policy.preflight("OPTIONS", preflight_headers(APP))
    assert status == 204 and headers["Access-Control-Allow-Credentials"] == "true"
    assert policy.preflight("OPTIONS", preflight_headers("https://evil.test")) == (403, {"Vary": "Origin"})


def test_no_expose_headers():
    assert "Access-Control-Expose-Headers" not in cors(APP, expose_headers=()).response_headers({"origin": APP})


# --- invalid configs ------------------------------------------------------------------------------------------


def test_star_with_credentials_refused():
    with pytest.raises(ValueError, match="Fetch"):
        CorsPolicy(allow_origins=("*",), allow_credentials=True)


@pytest.mark.parametrize("origin", ["app.example.com", "https://app.example.com/", "https://app.example.com/v1",
                                    "https://", "https://app.example.com:99999", "https://*.[::1]", "null",
                                    "https://a b.com", "https://*", "*.example.com"])
def test_bad_origin_refused(origin):
    with pytest.raises(ValueError, match="allow_origins") as err:
        CorsPolicy(allow_origins=(origin,))
    assert repr(origin) in str(err.value)


def test_star_mixed_with_origins_refused():
    with pytest.raises(ValueError, match="alone"):
        CorsPolicy(allow_origins=("*", APP))


@pytest.mark.parametrize("kw", [{"allow_methods": ("GET POST",)}, {"allow_methods": ("*",)},
                                {"allow_headers": ("x-*-y",)}, {"allow_headers": ("bad header",)},
                                {"expose_headers": ("x-*",)}, {"max_age_s": -1}])
def test_bad_cors_fields_refused(kw):
    with pytest.raises(ValueError):
        CorsPolicy(allow_origins=(APP,), **kw)


@pytest.mark.parametrize("host", ["", "*", "https://example.com", "example.com/x", "*.[::1]", "::1", "a..b",
                                  "example.com:0", "example.com:70000", "*.*.example.com", "exa mple.com"])
def test_bad_host_entry_refused(host):
    with pytest.raises(ValueError, match="allowed_hosts") as err:
        HostPolicy((host,))
    assert repr(host) in str(err.value)


# --- Host allow-list ------------------------------------------------------------------------------------------


def hosts(*entries: str) -> HttpPolicy:
    return HttpPolicy(hosts=HostPolicy(entries))


def refused(policy: HttpPolicy, headers: dict[str, str]) -> ServeError:
    with pytest.raises(ServeError) as err:
        policy.check_host(headers)
    return err.value


def test_empty_host_list_allows_anything():
    policy = HttpPolicy()
    for headers in ({"host": "evil.test"}, {}, {"host": "not a host"}):
        assert policy.check_host(headers) is None


def test_host_without_port_allows_any_port():
    policy = hosts("example.com", "127.0.0.1")
    for value in ("example.com", "example.com:8000", "EXAMPLE.com:443", "example.com.", "127.0.0.1:8000"):
        assert policy.check_host({"host": value}) is None, value


def test_unknown_host_refused_with_421():
    err = refused(hosts("example.com"), {"host": "evil.test"})
    assert err.info.status == 421
    assert err.info.code == "invalid_host"
    body = err.info.body()["error"]
    assert body["code"] == "invalid_host" and body["type"] == "invalid_request_error"
    assert "evil.test" in body["message"]
    for value in ("sub.example.com", "example.com.evil.net", "evil-example.com", "example.com:", "example.com:x",
                  "", "example.com:0"):
        assert refused(hosts("example.com"), {"host": value}).info.status == 421, value


def test_missing_host_refused():
    err = refused(hosts("example.com"), {})
    assert err.info.status == 421 and err.info.code == "invalid_host" and "missing" in err.info.message


def test_host_with_port_allows_that_port_only():
    policy = hosts("localhost:8000")
    assert policy.check_host({"host": "localhost:8000"}) is None
    assert policy.check_host({"host": "LocalHost:8000"}) is None
    for value in ("localhost", "localhost:8001", "localhost:80"):
        assert refused(policy, {"host": value}).info.status == 421, value


def test_wildcard_host():
    policy = hosts("*.example.com")
    assert policy.check_host({"host": "api.example.com"}) is None
    assert policy.check_host({"host": "a.b.example.com:9000"}) is None
    for value in ("example.com", "evil-example.com", "example.com.evil.net"):
        assert refused(policy, {"host": value}).info.status == 421, value
    with_port = hosts("*.example.com:8443")
    assert with_port.check_host({"host": "api.example.com:8443"}) is None
    assert refused(with_port, {"host": "api.example.com"}).info.status == 421


def test_ipv6_hosts():
    policy = hosts("[::1]")
    assert policy.check_host({"host": "[::1]"}) is None
    assert policy.check_host({"host": "[::1]:8000"}) is None
    assert policy.check_host({"host": "[0:0:0:0:0:0:0:1]:8000"}) is None  # the same address, spelled out
    for value in ("::1", "[::2]", "[::1", "[::1]:", "[zz::1]"):
        assert refused(policy, {"host": value}).info.status == 421, value
    port_only = hosts("[::1]:8000")
    assert port_only.check_host({"host": "[::1]:8000"}) is None
    assert refused(port_only, {"host": "[::1]"}).info.status == 421


def test_host_and_cors_together():
    policy = HttpPolicy(CorsPolicy(allow_origins=(APP,)), HostPolicy(("api.example.com",)))
    assert policy.check_host({"host": "api.example.com"}) is None
    assert policy.response_headers({"origin": APP})["Access-Control-Allow-Origin"] == APP
    assert policy.cors.allow_origins == (APP,) and policy.hosts.allowed_hosts == ("api.example.com",)
