"""Who Sockend lets in: the Origin of a websocket upgrade (a page of another origin must
not call the mesh with the visitor's browser) and the files ``--static`` serves (never a
dotfile, never a path outside the folder)."""
from __future__ import annotations

from pathlib import Path

import pytest
import trio
from hypothesis import given, settings, strategies as st
from trio_websocket import ConnectionRejected, open_websocket_url

from sockend import SockendConfig
from sockend.http import resolve_static
from sockend.origin import OriginPolicy

from test_sockend import FakeMesh, ask, chromium_or_skip, run_page, running, url


def origin(value: str) -> list[tuple[bytes, bytes]]:
    return [(b"Origin", value.encode())]


def transfer_mesh() -> tuple[FakeMesh, list[dict]]:
    mesh, done = FakeMesh(), []

    @mesh.on("", "transfer")
    async def transfer(req):
        done.append(req)
        return "sent"
    return mesh, done


@pytest.mark.e2e
async def test_a_page_of_another_origin_cannot_open_a_websocket():
    mesh, done = transfer_mesh()
    with trio.fail_after(20):
        async with running(mesh) as server:
            with pytest.raises(ConnectionRejected) as refused:
                async with open_websocket_url(url(server), extra_headers=origin("http://evil.example")) as ws:
                    await ask(ws, {"id": 1, "type": "transfer", "data": {"to": "mallory"}})
            assert refused.value.status_code == 403
            assert b"origin 'http://evil.example' is not allowed" in (refused.value.body or b"")
            assert done == [] and server.stats["refused_403"] == 1


def site_with_secrets(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    (site / ".git").mkdir(parents=True)
    (site / "sub").mkdir()
    (site / "index.html").write_text("hi")
    (site / "sub" / "page.html").write_text("page")
    (site / ".env").write_text("SECRET=1")
    (site / ".git" / "config").write_text("[core]")
    (site / "sub" / ".htpasswd").write_text("u:p")
    (site / "env-link").symlink_to(site / ".env")           # a visible name for a dotfile
    (site / "git-dir").symlink_to(site / ".git")
    (tmp_path / "outside.txt").write_text("no")
    (site / "out-link").symlink_to(tmp_path / "outside.txt")
    return site


DOT_AND_ESCAPING = ("/.env", "/.git/config", "/sub/.htpasswd", "/%2eenv", "/%2Egit/config",
                    "/sub/%2ehtpasswd", "/env-link", "/git-dir/config", "/.", "/..", "/sub/..",
                    "/../outside.txt", "/%2e%2e/outside.txt", "/%2E%2E/outside.txt",
                    "/..%2foutside.txt", "/sub/..%2f..%2foutside.txt", "/out-link", "//etc/passwd",
                    "/sub/../.env", "/./.env", "/%00.env", "/sub%2f.htpasswd", "/%252e%252e/outside.txt",
                    "/%252eenv", "/sub/page.html/..", "/\\..\\outside.txt")


def test_static_never_serves_dotfiles_nor_anything_outside_the_folder(tmp_path):
    site = site_with_secrets(tmp_path)
    assert resolve_static("/", site) == (site / "index.html").resolve()
    assert resolve_static("/sub/page.html", site) == (site / "sub" / "page.html").resolve()
    for bad in DOT_AND_ESCAPING:
        assert resolve_static(bad, site) is None, bad


@pytest.mark.e2e
async def test_dotfiles_get_a_404_like_any_missing_file(tmp_path):
    site = site_with_secrets(tmp_path)

    async def get(server, target: str) -> bytes:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            out = b""
            while chunk := await stream.receive_some(65536):
                out += chunk
            return out

    with trio.fail_after(20):
        async with running(FakeMesh(), static_dir=site) as server:
            missing = await get(server, "/no-such-file")
            assert missing.startswith(b"HTTP/1.1 404")
            for bad in DOT_AND_ESCAPING:
                assert await get(server, bad) == missing, bad   # the same answer: nothing leaks
            assert (await get(server, "/sub/page.html")).endswith(b"page")


# -- the origin policy, pure ---------------------------------------------------------------------

def test_the_same_origin_is_the_host_the_browser_asked():
    same = OriginPolicy()
    for origin, host in [("http://127.0.0.1:5555", "127.0.0.1:5555"), ("http://LOCALHOST:5555", "localhost:5555"),
                         ("http://app.example.com", "app.example.com"), ("http://app.example.com", "app.example.com:80"),
                         ("https://app.example.com", "App.Example.com"),   # TLS ended by a proxy in front
                         ("http://[::1]:5555", "[::1]:5555")]:
        assert same.refusal(origin, host) is None, (origin, host)
    for origin, host in [("http://evil.example", "127.0.0.1:5555"), ("http://127.0.0.1:5556", "127.0.0.1:5555"),
                         ("http://localhost:5555", "127.0.0.1:5555"), ("https://app.example.com", "app.example.com:80"),
                         ("null", "127.0.0.1:5555"), ("http://127.0.0.1:5555", None),
                         ("http://127.0.0.1:5555, http://evil.example", "127.0.0.1:5555"),   # two Origin headers
                         ("http://127.0.0.1:5555/path", "127.0.0.1:5555"), ("http://127.0.0.1:99999", "127.0.0.1:99999"),
                         ("", "x"), ("http://a:5555", "a:5555, b:5555")]:
        reason = same.refusal(origin, host)
        assert reason is not None and reason.startswith(f"origin {origin!r:.120}") and "not allowed" in reason


def test_listed_origins_are_allowed_besides_the_same_one_and_star_allows_all():
    policy = OriginPolicy(("HTTPS://App.Example.com:443", "http://localhost:3000", "http://localhost:3000"))
    assert policy.allowed == ("https://app.example.com", "http://localhost:3000")
    assert policy.refusal("https://app.example.com", "sockend.internal:5555") is None
    assert policy.refusal("http://localhost:3000", "127.0.0.1:5555") is None
    assert policy.refusal("http://sockend.internal:5555", "sockend.internal:5555") is None   # same origin
    assert policy.refusal("http://app.example.com", "sockend.internal:5555") is not None    # not https
    assert policy.refusal("http://localhost:3001", "127.0.0.1:5555") is not None
    assert OriginPolicy(("*",)).refusal("http://evil.example", "127.0.0.1:5555") is None
    assert OriginPolicy(("*",)).refusal("null", None) is None


def test_no_origin_header_is_a_program_and_is_let_in():
    assert OriginPolicy().refusal(None, "127.0.0.1:5555") is None
    assert OriginPolicy().refusal(None, None) is None


@pytest.mark.parametrize("entry", ["null", "NULL", "app.example.com", "https://app.example.com/", "https://a.b/x",
                                   "https://u:p@a.b", "https://a.b:70000", "", " https://a.b", "https://a.b,https://c.d"])
def test_a_bad_allowed_origin_is_refused_at_configuration_naming_it(entry):
    with pytest.raises(ValueError, match="allowed origins") as bad:
        SockendConfig(allowed_origins=(entry,))
    assert repr(entry)[:60] in str(bad.value) or "null" in str(bad.value)
    with pytest.raises(ValueError, match="not one string"):
        OriginPolicy("https://a.b")   # type: ignore[arg-type]


hosts = st.one_of(st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True),
                  st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(lambda a: f"[{a}]"))


@given(scheme=st.sampled_from(["http", "https"]), host=hosts, port=st.integers(1, 65535))
@settings(max_examples=300, deadline=None)
def test_a_page_is_always_let_into_its_own_origin(scheme, host, port):
    policy = OriginPolicy()
    assert policy.refusal(f"{scheme}://{host}:{port}", f"{host}:{port}") is None
    assert policy.refusal(f"{scheme}://{host.upper()}:{port}", f"{host}:{port}") is None
    assert policy.refusal(f"{scheme}://{host}:{port}", f"{host}:{port % 65535 + 1}") is not None
    assert policy.refusal(f"{scheme}://x{host}:{port}", f"{host}:{port}") is not None


@given(origin=st.one_of(st.none(), st.text(max_size=80)), host=st.one_of(st.none(), st.text(max_size=80)),
       allowed=st.lists(st.sampled_from(["*", "https://a.example", "http://localhost:3000"]), max_size=3))
@settings(max_examples=500, deadline=None)
def test_any_headers_get_an_answer_never_an_exception(origin, host, allowed):
    reason = OriginPolicy(tuple(allowed)).refusal(origin, host)
    assert reason is None or (isinstance(reason, str) and len(reason) < 400)
    if origin is not None and "*" not in allowed and (host is None or origin.strip() != origin):
        assert reason is not None or origin in ("https://a.example", "http://localhost:3000")


def test_the_command_line_takes_repeated_allow_origin_and_refuses_a_bad_one(capsys):
    from sockend.__main__ import main, make_config, parse_args

    config = make_config(parse_args(["--allow-origin", "https://a.example", "--allow-origin", "http://b:81"]))
    assert config.allowed_origins == ("https://a.example", "http://b:81")
    assert make_config(parse_args([])).allowed_origins == ()
    assert main(["--allow-origin", "null"]) == 2
    assert "allowed origins" in capsys.readouterr().err


# -- the origin check, served ----------------------------------------------------------------------

@pytest.mark.e2e
async def test_the_same_origin_listed_origins_and_programs_get_in():
    mesh, done = transfer_mesh()
    with trio.fail_after(20):
        async with running(mesh, allowed_origins=("http://app.example:8080",)) as server:
            for headers in (origin(f"http://127.0.0.1:{server.port}"), origin("http://app.example:8080"), None):
                async with open_websocket_url(url(server), extra_headers=headers) as ws:
                    assert (await ask(ws, {"id": 1, "type": "transfer"}))["ok"] is True
            with pytest.raises(ConnectionRejected) as refused:
                async with open_websocket_url(url(server), extra_headers=origin(f"http://localhost:{server.port}")):
                    pass
            assert refused.value.status_code == 403
            assert len(done) == 3 and server.stats["refused_403"] == 1


CROSS_ORIGIN_PAGE = """<!doctype html><html><body><pre id="out"></pre><script>
  const out = document.getElementById("out");
  const ws = new WebSocket("ws://127.0.0.1:TARGET_PORT/");
  ws.onopen = () => ws.send(JSON.stringify({id: 1, type: "transfer", data: {to: "mallory"}}));
  ws.onmessage = e => { out.textContent += "answered " + e.data + ";"; };
  ws.onclose = e => { out.textContent += "closed " + e.code + ";"; };
</script></body></html>
"""


@pytest.mark.e2e
async def test_a_real_browser_on_another_origin_is_refused(tmp_path):
    """What the attack was: a page of another origin (here another port) opening a
    websocket to Sockend in a visitor's browser.  The same-origin page is
    test_sockend.py's browser test."""
    chromium = chromium_or_skip()
    mesh, done = transfer_mesh()
    site = tmp_path / "elsewhere"
    site.mkdir()
    with trio.fail_after(55):
        async with running(mesh) as target:
            (site / "index.html").write_text(CROSS_ORIGIN_PAGE.replace("TARGET_PORT", str(target.port)))
            async with running(FakeMesh(), static_dir=site) as elsewhere:
                text = await run_page(chromium, f"http://127.0.0.1:{elsewhere.port}/", tmp_path,
                                      "document.getElementById('out').textContent",
                                      until=lambda t: "closed" in t or "answered" in t, timeout=40)
    assert text == "closed 1006;" and done == []
    assert target.stats["refused_403"] == 1 and target.stats["clients_accepted"] == 0
