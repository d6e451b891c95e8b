"""The page's login (covid_keras.serving.web_auth, through covid_keras.web's app): a signed cookie
that survives a restart and ends with the token file or its lifetime, logout, a limit on
failed logins per address (bounded in memory), the cookie's flags."""

from __future__ import annotations

import asyncio
import hmac

import pytest

pytest.importorskip("starlette", reason="the [web] extra is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")
pytest.importorskip("python_multipart", reason="the [web] extra is not installed")

from covid_keras.serving import model_server, web_app, web_auth  # noqa: E402
from tests.helpers import WEB_SALT as SALT  # noqa: E402
from tests.helpers import FakeModel  # noqa: E402

TOKEN = "page-token-0123456789abcdef"
FORM = {"content-type": "application/x-www-form-urlencoded", "Origin": "http://127.0.0.1"}
HOUR = 3600.0


class Clock:
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_app(tmp_path, access=None, **kw):
    card = web_app.model_card(FakeModel.info, FakeModel.source, None, None)
    return web_app.create_app(FakeModel(), card, SALT, tmp_dir=str(tmp_path / "root"),
                              access=access or model_server.Access(["127.0.0.1"], TOKEN), **kw)


def call(app, method, path, address="127.0.0.1", cookie=None, base="http://127.0.0.1",
         **kw) -> httpx.Response:
    """One request from ``address``, with no cookie jar (``cookie``: the login cookie's
    value, sent as it is)."""
    headers = dict(kw.pop("headers", {}))
    if cookie is not None:
        headers["Cookie"] = f"{web_app.TOKEN_COOKIE}={cookie}"

    async def go():
        transport = httpx.ASGITransport(app=app, client=(address, 40000))
        async with httpx.AsyncClient(transport=transport, base_url=base) as client:
            return await client.request(method, path, headers=headers, **kw)

    return asyncio.run(go())


def login(app, token=TOKEN, address="127.0.0.1", **kw) -> httpx.Response:
    return call(app, "POST", "/login", address, content=f"token={token}", headers=FORM, **kw)


def cookie_of(response) -> str:
    assert response.status_code == 303, response.text
    return response.cookies[web_app.TOKEN_COOKIE]


def set_cookie_attributes(response) -> dict:
    """The Set-Cookie header's attributes, lower-cased: {name: value or True}."""
    _, *attrs = response.headers["set-cookie"].split(";")
    out = {}
    for a in attrs:
        k, eq, v = a.strip().partition("=")
        out[k.lower()] = v.lower() if eq else True
    return out


def test_a_login_survives_a_restart_and_ends_when_the_token_file_changes(tmp_path):
    """The cookie's key comes from the token file, not from the process: a second start of
    the page (same file) accepts the first one's cookie; a new token refuses it."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")

    def started():
        return make_app(tmp_path, model_server.Access.for_binding("127.0.0.1", ["127.0.0.1"],
                                                                  str(token_file)))

    first = started()
    cookie = cookie_of(login(first))
    assert cookie.count(".") == 3 and TOKEN not in cookie
    assert call(first, "GET", "/api/card", cookie=cookie).status_code == 200
    restarted = started()
    assert call(restarted, "GET", "/api/card", cookie=cookie).status_code == 200
    assert call(restarted, "GET", "/", cookie=cookie).status_code == 200
    token_file.write_text("a-new-token-fedcba9876543210\n")
    rotated = started()
    assert call(rotated, "GET", "/api/card", cookie=cookie).status_code == 401
    assert 'action="login"' in call(rotated, "GET", "/", cookie=cookie).text
    assert call(rotated, "GET", "/api/card", cookie=cookie_of(login(
        rotated, "a-new-token-fedcba9876543210"))).status_code == 200


def test_a_login_expires(tmp_path):
    clock = Clock()
    sessions = web_auth.Sessions(TOKEN, 12 * HOUR, clock=clock)
    app = make_app(tmp_path, sessions=sessions)
    answer = login(app)
    cookie = cookie_of(answer)
    assert set_cookie_attributes(answer)["max-age"] == str(12 * 3600)
    clock.now += 12 * HOUR - 1
    assert call(app, "GET", "/api/card", cookie=cookie).status_code == 200
    clock.now += 1
    assert call(app, "GET", "/api/card", cookie=cookie).status_code == 401
    assert call(app, "GET", "/", cookie=cookie).status_code == 401  # the login form
    # the expiry is signed: a cookie whose issue time is moved on is refused
    clock.now -= 12 * HOUR
    version, issued, nonce, mac = cookie.split(".")
    moved = f"{version}.{int(issued) + 7200}.{nonce}.{mac}"
    assert call(app, "GET", "/api/card", cookie=cookie).status_code == 200
    assert call(app, "GET", "/api/card", cookie=moved).status_code == 401
    # a page restarted with a shorter --session_hours applies it to cookies already out
    clock.now += 2 * HOUR
    shorter = make_app(tmp_path, sessions=web_auth.Sessions(TOKEN, HOUR, clock=clock))
    assert call(shorter, "GET", "/api/card", cookie=cookie).status_code == 401
    assert call(app, "GET", "/api/card", cookie=cookie).status_code == 200
    # junk, an unsigned or a raw-token cookie open nothing
    for junk in ("x", TOKEN, f"v1.{int(clock.now)}.{'0' * 32}.{'0' * 64}", cookie + "0"):
        assert call(app, "GET", "/api/card", cookie=junk).status_code == 401, junk


def test_logout_clears_and_revokes_the_cookie(tmp_path):
    app = make_app(tmp_path)
    page = call(app, "GET", "/", headers={"Authorization": f"Bearer {TOKEN}"}).text
    assert 'id="logout"' in page  # the page's sign-out button
    cookie = cookie_of(login(app))
    # cross-site: refused, and the session stays
    cross = call(app, "POST", "/logout", cookie=cookie,
                 headers={"Origin": "http://evil.example"})
    assert cross.status_code == 403 and "set-cookie" not in cross.headers
    assert call(app, "POST", "/logout", cookie=cookie,
                headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert call(app, "GET", "/logout", cookie=cookie).status_code == 405
    assert call(app, "GET", "/api/card", cookie=cookie).status_code == 200
    out = call(app, "POST", "/logout", cookie=cookie, headers={"Origin": "http://127.0.0.1"})
    assert (out.status_code, out.headers["location"]) == (303, "login")
    attrs = set_cookie_attributes(out)
    assert out.headers["set-cookie"].startswith(f'{web_app.TOKEN_COOKIE}="";') or (
        out.headers["set-cookie"].startswith(f"{web_app.TOKEN_COOKIE}=;"))
    assert attrs["max-age"] == "0"
    assert {"httponly", "path", "samesite"} <= set(attrs) and attrs["samesite"] == "strict"
    # a copy of the logged-out cookie opens nothing either (revoked in this process)
    assert call(app, "GET", "/api/card", cookie=cookie).status_code == 401
    assert call(app, "GET", "/api/card", cookie=cookie_of(login(app))).status_code == 200
    # without a token there is nothing to sign out of: no button
    open_app = make_app(tmp_path, model_server.Access(["127.0.0.1"], None))
    assert 'id="logout"' not in call(open_app, "GET", "/").text
    assert call(open_app, "POST", "/logout").status_code == 303


def test_the_sixth_bad_token_in_a_minute_is_refused_per_address(tmp_path, monkeypatch):
    clock = Clock(100.0)
    limiter = web_auth.LoginLimiter(5, 60.0, fail_delay_s=0.0, clock=clock)
    app = make_app(tmp_path, login_limiter=limiter)
    compared = []
    real = hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # the token check is constant-time
    bad = "x" * len(TOKEN)
    for i in range(5):
        clock.now += 1
        assert login(app, bad, "10.0.0.1").status_code == 401, i
    assert (bad.encode(), TOKEN.encode()) in compared
    clock.now += 1
    sixth = login(app, bad, "10.0.0.1")
    assert sixth.status_code == 429 and sixth.headers["retry-after"] == "55"
    assert "set-cookie" not in sixth.headers
    # while it is limited even the right token is refused, without being compared
    compared.clear()
    right = login(app, TOKEN, "10.0.0.1")
    assert (right.status_code, "set-cookie" in right.headers) == (429, False)
    assert (TOKEN.encode(), TOKEN.encode()) not in compared
    # another address is still allowed (and its good login is not counted)
    assert login(app, bad, "10.0.0.2").status_code == 401
    assert login(app, TOKEN, "10.0.0.2").status_code == 303
    # a wrong form or a cross-site POST is not a guess and does not count
    assert call(app, "POST", "/login", "10.0.0.3", json={"token": bad}).status_code == 415
    assert login(app, TOKEN, "10.0.0.3").status_code == 303
    # the oldest failure leaves the window: one more try
    clock.now += 50
    assert login(app, bad, "10.0.0.1").headers.get("retry-after") == "5"
    clock.now += 5
    assert login(app, bad, "10.0.0.1").status_code == 401
    assert login(app, bad, "10.0.0.1").status_code == 429
    clock.now += 60
    assert login(app, TOKEN, "10.0.0.1").status_code == 303


def test_concurrent_guesses_cannot_all_pass_the_limit(tmp_path):
    """Twenty bad logins sent at once from one address, each body arriving in two pieces
    (so every request waits while the others run): five are compared, the rest get 429."""
    limiter = web_auth.LoginLimiter(5, 60.0, fail_delay_s=0.0, clock=Clock(100.0))
    app = make_app(tmp_path, login_limiter=limiter)

    async def body():
        yield b"token="
        await asyncio.sleep(0.01)
        yield b"x" * len(TOKEN)

    async def go():
        transport = httpx.ASGITransport(app=app, client=("10.0.0.9", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            answers = await asyncio.gather(*(c.post("/login", content=body(), headers=FORM)
                                             for _ in range(20)))
        return sorted(a.status_code for a in answers)

    assert asyncio.run(go()) == [401] * 5 + [429] * 15


def test_the_login_limiter_stays_bounded():
    clock = Clock(0.0)
    limiter = web_auth.LoginLimiter(5, 60.0, max_clients=16, clock=clock)
    for i in range(5000):  # an attacker with many addresses
        clock.now += 0.001
        limiter.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
        assert len(limiter) <= 16
    # the latest addresses are remembered; five failures from one of them still block it
    for _ in range(4):
        limiter.failed("10.0.19.135")  # address 4999
    assert limiter.retry_after("10.0.19.135") > 0 and len(limiter) == 16
    # addresses whose failures are all out of the window are forgotten first
    clock.now += 61
    limiter.failed("192.0.2.1")
    assert len(limiter) == 1 and limiter.retry_after("10.0.19.135") == 0
    # one IPv6 host holds a whole /64: its addresses are counted together
    for i in range(5):
        limiter.failed(f"2001:db8:1:2::{i + 1:x}")
    assert limiter.retry_after("2001:db8:1:2:ffff::9") > 0
    assert limiter.retry_after("2001:db8:1:3::1") == 0
    assert limiter.retry_after("::ffff:192.0.2.1") == 0 and len(limiter) == 2
    # logouts are bounded too
    sessions = web_auth.Sessions(TOKEN, HOUR, clock=clock, max_revoked=8)
    cookies = [sessions.issue() for _ in range(20)]
    assert all(sessions.revoke(c) for c in cookies)
    assert sessions.revoked == 8 and not sessions.valid(cookies[-1])


def test_the_cookie_flags(tmp_path):
    def attrs(**kw):
        answer = login(make_app(tmp_path, **{k: v for k, v in kw.items() if k != "base"}),
                       base=kw.get("base", "http://127.0.0.1"))
        cookie_of(answer)
        return set_cookie_attributes(answer)

    plain = attrs()
    assert plain.get("httponly") is True and plain.get("samesite") == "strict"
    assert plain.get("path") == "/" and "secure" not in plain
    assert "domain" not in plain
    assert attrs(secure_cookies=True).get("secure") is True
    # a request that arrived as https (uvicorn's X-Forwarded-Proto from a trusted proxy)
    assert attrs(base="https://127.0.0.1").get("secure") is True



def test_the_login_form_lets_a_browser_send_its_origin(tmp_path):
    """A form POST from a no-referrer page carries ``Origin: null`` (the Fetch standard),
    which the Origin check refuses: the login form's page is same-origin instead (it links
    nowhere, so no referrer leaves the page either way)."""
    app = make_app(tmp_path)
    for form_page in (call(app, "GET", "/login"), call(app, "GET", "/")):
        assert form_page.headers["referrer-policy"] == "same-origin"
        assert 'content="same-origin"' in form_page.text and 'action="login"' in form_page.text
    assert call(app, "POST", "/login", content=f"token={TOKEN}",
                headers={**FORM, "Origin": "null"}).status_code == 403


def test_sign_in_and_out_in_headless_chromium(tmp_path):
    """The login form, the page's Sign out button (under the page's CSP) and the login form
    again; no model (FakeModel), so a browser's start is the whole cost (about 3 s). It
    found that the form could never sign in: its page's no-referrer policy made Chromium
    send ``Origin: null``, which the Origin check refused."""
    from tests.helpers import CHROMIUM, CHROMIUM_ARGS, LiveServer, chromium_or_skip

    chromium_or_skip()
    from playwright.sync_api import sync_playwright

    console = []
    with LiveServer(make_app(tmp_path)) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page()
            tab.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
            tab.on("pageerror", lambda e: console.append(str(e)))
            tab.goto(server.url + "/", wait_until="load")
            tab.fill('input[name="token"]', TOKEN)
            tab.click('button[type="submit"]')
            tab.wait_for_selector("#logout")
            assert "Research use only" in tab.inner_text("#notice")
            cookie = {c["name"]: c for c in tab.context.cookies()}[web_app.TOKEN_COOKIE]
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            tab.click("#logout")
            tab.wait_for_selector('input[name="token"]')
            assert tab.context.cookies() == []
            tab.goto(server.url + "/", wait_until="load")
            assert tab.locator('input[name="token"]').count() == 1
        finally:
            browser.close()
    # the 401s of the login form (before signing in and after signing out) are expected
    assert [m for m in console if "status of 401" not in m] == [], console


def test_bearer_guesses_on_any_route_count_against_the_same_limit(tmp_path):
    """A wrong ``Authorization: Bearer`` on the page's API is a guess like a login's: the
    sixth in a minute from one address is refused 429 (even the right token), another
    address is not; a request with no header at all (a browser before its login) does not
    count."""
    clock = Clock(100.0)
    limiter = web_auth.LoginLimiter(5, 60.0, fail_delay_s=0.0, clock=clock)
    app = make_app(tmp_path, login_limiter=limiter)

    def card(token, address="10.0.0.1"):
        return call(app, "GET", "/api/card", address,
                    headers={"Authorization": f"Bearer {token}"})

    for _ in range(8):  # no header: 401, not counted
        assert call(app, "GET", "/api/card", "10.0.0.1").status_code == 401
    assert card(TOKEN).status_code == 200
    for i in range(5):
        assert card("x" * len(TOKEN)).status_code == 401, i
    limited = card(TOKEN)
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0
    assert login(app, TOKEN, "10.0.0.1").status_code == 429  # one limit for both ways in
    assert card(TOKEN, "10.0.0.2").status_code == 200
    clock.now += 61
    assert card(TOKEN).status_code == 200
