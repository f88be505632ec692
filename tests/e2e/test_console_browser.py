"""The console in a real browser: Debian's chromium, headless, driven by Selenium through Debian's
chromedriver (nothing downloaded). A tenant administrator's day, start to end, as a person clicks
it; a second tenant's administrator who sees none of it; a forged form that changes nothing; and
screenshots of the main pages at desktop and phone width, saved as test artefacts (not committed)
in $CMCD_ARTIFACTS, else test-artifacts/console/ under the project.

The browser reaches only the daemon on 127.0.0.1: every other host name fails to resolve inside
chromium (--host-resolver-rules), and its background network (updates, sync, safe browsing) is off.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyotp
import pytest

from tests.conftest import REQUIRE_PEERS, Cmcd, wait_until
from tests.console_client import ConsoleClient
from tests.peers import Sink

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("CMCD_ARTIFACTS") or Path(__file__).parents[2] / "test-artifacts" / "console")
DESKTOP, PHONE = (1280, 900), (390, 844)

pytestmark = pytest.mark.peer


def _have_browser() -> bool:
    return bool(shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER))


if not _have_browser():
    if REQUIRE_PEERS:
        raise RuntimeError(f"{CHROMIUM} and {CHROMEDRIVER} are needed (apt-get install chromium chromium-driver)")
    pytest.skip("needs Debian's chromium and chromium-driver", allow_module_level=True)


def browser(downloads: Path) -> WebDriver:
    o = webdriver.ChromeOptions()
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--ignore-certificate-errors",
        "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-default-apps", "--disable-features=Translate,OptimizationHints,MediaRouter",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--window-size={DESKTOP[0]},{DESKTOP[1]}", "--lang=en-US",
    ):  # fmt: skip
        o.add_argument(arg)
    o.binary_location = CHROMIUM
    o.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                        "download.prompt_for_download": False,
                                        "intl.accept_languages": "en-US,en"})  # fmt: skip
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=o)
    driver.set_page_load_timeout(60)
    driver.implicitly_wait(15)  # an element looked up waits for the page that brings it (a condition, not a sleep)
    return driver


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, ca: Any) -> Iterator[tuple[Cmcd, Sink]]:
    sink = Sink().start()
    d = Cmcd(
        tmp_path_factory.mktemp("console-browser"),
        ca,
        {
            "api": {"listen": "127.0.0.1:0"},
            "delivery": {"enabled": True, "routes": {"*": f"127.0.0.1:{sink.port}"}, "retry_schedule": ["1s"]},
        },
    )
    d.start().provision()
    yield d, sink
    d.stop()
    sink.stop()


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[WebDriver]:
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    drv = browser(downloads)
    drv.downloads = downloads  # type: ignore[attr-defined]
    try:
        yield drv
    finally:
        drv.quit()


def admin_with_totp(d: Cmcd, tenant: str, login: str) -> tuple[str, pyotp.TOTP]:
    password = f"{login} long secret"
    d.admin("user.add", tenant=tenant, login=login, role="admin", password=password)
    secret = d.admin("user.otp-enroll", tenant=tenant, login=login)["secret"]
    totp = pyotp.TOTP(secret)
    d.admin("user.otp-confirm", tenant=tenant, login=login, code=totp.at(time.time() - 30))
    return password, totp


def base(d: Cmcd) -> str:
    return f"https://127.0.0.1:{d.api_port}"


def fill(drv: WebDriver, field_id: str, value: str) -> None:
    el = drv.find_element(By.ID, field_id)
    el.clear()
    el.send_keys(value)


def press(drv: WebDriver, form_action: str, label: str | None = None) -> None:
    """Click the submit button of the form posting to FORM_ACTION (the one labelled LABEL)."""
    buttons = drv.find_elements(By.CSS_SELECTOR, f'form[action="{form_action}"] button[type="submit"]')
    if label is not None:
        buttons = [b for b in buttons if b.text.strip() == label]
    assert buttons, f"no submit button for {form_action} ({label}) on {drv.current_url}"
    buttons[0].click()


def sign_in(drv: WebDriver, d: Cmcd, login: str, password: str, totp: pyotp.TOTP) -> None:
    drv.get(base(d) + "/login")
    fill(drv, "login", login)
    fill(drv, "password", password)
    press(drv, "/login")
    wait_until(lambda: "/login/code" in drv.current_url, "the one-time code page", 30)
    fill(drv, "code", totp.now())
    press(drv, "/login/code")
    wait_until(lambda: drv.current_url.rstrip("/") == base(d), "the dashboard after sign-in", 30)


def shoot(drv: WebDriver, name: str) -> None:
    """Screenshots of the page at desktop and phone width (test artefacts for a person to look at)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for label, (w, h) in (("desktop", DESKTOP), ("phone", PHONE)):
        drv.set_window_size(w, h)
        height = drv.execute_script("return document.documentElement.scrollHeight")
        drv.set_window_size(w, min(max(h, int(height)), 4000))
        assert drv.save_screenshot(str(ARTIFACTS / f"{name}-{label}.png"))
    drv.set_window_size(*DESKTOP)


def no_horizontal_scroll(drv: WebDriver) -> bool:
    """The page itself fits the window (wide tables scroll inside their own box)."""
    return bool(drv.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1"))


def test_chromium_signs_in_with_password_and_totp(world: tuple[Cmcd, Sink], driver: WebDriver) -> None:
    d, _ = world
    password, totp = admin_with_totp(d, "acme", "browser-admin0")
    sign_in(driver, d, "browser-admin0", password, totp)
    assert "Dashboard" in driver.title
    cookies = {c["name"]: c for c in driver.get_cookies()}
    session = cookies["__Host-cmcd_session"]
    assert session["secure"] and session["httpOnly"] and session["sameSite"] == "Strict"
    shoot(driver, "dashboard")
    driver.set_window_size(*PHONE)
    assert no_horizontal_scroll(driver)


MAIN_PAGES = ("/", "/mail", "/users", "/keys", "/domains", "/domains/acme.test", "/blocks", "/webhooks",
              "/logins", "/ops", "/account", "/contact")  # fmt: skip

#: every field a person can fill has a label (its own <label for>, a wrapping label or aria-label)
UNLABELLED_FIELDS = """
return Array.from(document.querySelectorAll('input, select, textarea'))
  .filter(e => e.type !== 'hidden' && e.labels.length === 0 && !e.getAttribute('aria-label'))
  .map(e => e.outerHTML);
"""


def wait_page(drv: WebDriver, path_start: str) -> None:
    wait_until(lambda: drv.current_url.startswith(base_url(drv) + path_start), f"the browser at {path_start}", 30)


def base_url(drv: WebDriver) -> str:
    m = re.match(r"https://[^/]+", drv.current_url)
    assert m is not None
    return m.group(0)


def nav(drv: WebDriver, label: str) -> None:
    """Follow the main menu's link LABEL, as a person would."""
    drv.find_element(By.CSS_SELECTOR, "nav.menu").find_element(By.LINK_TEXT, label).click()


def test_a_tenant_administrators_day(world: tuple[Cmcd, Sink], driver: WebDriver) -> None:
    d, sink = world
    password, totp = admin_with_totp(d, "acme", "day-admin")
    # sign in with the keyboard alone: type, Tab to the next field, Enter to send
    driver.get(base(d) + "/")
    wait_page(driver, "/login")
    driver.find_element(By.ID, "login").send_keys("day-admin", Keys.TAB, password, Keys.ENTER)
    wait_page(driver, "/login/code")
    driver.find_element(By.ID, "code").send_keys(totp.now(), Keys.ENTER)
    wait_until(lambda: driver.current_url.rstrip("/") == base(d), "the dashboard after sign-in", 30)

    # add a user (a viewer, password generated and shown once) and require a one-time password of it
    nav(driver, "Users")
    fill(driver, "add-login", "day-viewer")
    Select(driver.find_element(By.ID, "add-role")).select_by_value("viewer")
    press(driver, "/users")
    generated = driver.find_element(By.ID, "new-password").text
    assert len(generated) >= 12
    driver.get(base(d) + "/users/day-viewer")
    press(driver, "/users/day-viewer/otp-require")
    users = {u["login"]: u for u in d.admin("user.list", tenant="acme")}
    assert users["day-viewer"]["role"] == "viewer"
    viewer = ConsoleClient(d.api_port, d.client_context())
    assert viewer.sign_in("day-viewer", generated).location == "/enrol"  # required: enrolment first

    # an API key for the application, shown once; a message sent with it through the API
    nav(driver, "Sending credentials")
    Select(driver.find_element(By.ID, "key-login")).select_by_value("alice")
    press(driver, "/keys")
    token = driver.find_element(By.ID, "new-token").text.strip()
    assert token.startswith("cmk_")
    before = len(sink.messages)
    status, _, reply = d.http("POST", "/v1/emails", {"from": "alice@acme.test", "to": ["day@dst.test"],
                              "subject": "Order 7", "text": "Thanks", "tags": ["day"]}, token=token)  # fmt: skip
    assert status == 202, reply
    sink.wait_for(before + 1, 30)
    qid = reply["id"]

    # the delivery in the mail log, found by its tag; its history; the selection as CSV
    def delivered_row_shown() -> bool:
        nav(driver, "Mail log")
        fill(driver, "tag", "day")
        driver.find_element(By.ID, "tag").send_keys(Keys.ENTER)
        return bool(driver.find_elements(By.CSS_SELECTOR, "td.event-delivered"))

    wait_until(delivered_row_shown, "the delivered row in the mail log page", 30)
    shoot(driver, "mail-log")
    driver.find_element(By.LINK_TEXT, qid).click()
    history = driver.find_element(By.TAG_NAME, "main").text
    assert "accepted" in history and "delivered" in history and "250" in history
    shoot(driver, "mail-history")
    nav(driver, "Mail log")
    fill(driver, "tag", "day")
    driver.find_element(By.ID, "tag").send_keys(Keys.ENTER)
    driver.find_element(By.LINK_TEXT, "Download CSV").click()
    downloads: Path = driver.downloads  # type: ignore[attr-defined]

    def downloaded() -> Path | None:
        done = [p for p in downloads.iterdir() if p.suffix == ".csv"]
        return done[0] if done and not list(downloads.glob("*.crdownload")) else None

    path = wait_until(downloaded, "the CSV download", 30)
    rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    assert {(r["queue_id"], r["event"]) for r in rows} == {(qid, "accepted"), (qid, "delivered")}
    assert all(r["recipient"] == "day@dst.test" for r in rows)

    # the sign-in in the login log
    nav(driver, "Login log")
    wait_until(lambda: "day-admin" in driver.find_element(By.TAG_NAME, "main").text or driver.refresh(),
               "the console sign-in on the login log page", 30)  # fmt: skip
    assert "CONSOLE" in driver.find_element(By.TAG_NAME, "main").text

    # every main page: labelled fields, fits a phone's width, a screenshot at both widths
    for page_path in MAIN_PAGES:
        driver.get(base(d) + page_path)
        assert driver.execute_script(UNLABELLED_FIELDS) == [], page_path
        driver.set_window_size(*PHONE)
        assert no_horizontal_scroll(driver), page_path
        driver.set_window_size(DESKTOP[0] // 2, DESKTOP[1] // 2)  # what 200 % zoom leaves of a desktop window
        assert no_horizontal_scroll(driver), page_path
        driver.set_window_size(*DESKTOP)
        shoot(driver, "page" + (page_path.replace("/", "-").replace(".", "-") if page_path != "/" else "-dashboard"))
    driver.get(base(d) + "/lang?to=ja&next=/")
    assert "ダッシュボード" in driver.find_element(By.TAG_NAME, "h1").text
    shoot(driver, "dashboard-ja")
    driver.get(base(d) + "/lang?to=en&next=/")

    # sign out: the session is gone, in the store too
    old = {c["name"]: c["value"] for c in driver.get_cookies()}["__Host-cmcd_session"]
    press(driver, "/logout")
    wait_page(driver, "/login")
    driver.get(base(d) + "/mail")
    wait_page(driver, "/login")
    replay = ConsoleClient(d.api_port, d.client_context())
    replay.jar.set_cookie(_cookie("__Host-cmcd_session", old))
    assert replay.get("/").status == 303


def _cookie(name: str, value: str) -> Any:
    import http.cookiejar

    return http.cookiejar.Cookie(0, name, value, None, False, "127.0.0.1", False, False, "/", True, True, None,
                                 False, None, None, {})  # fmt: skip


def test_another_tenants_admin_sees_none_of_it_and_a_forged_form_changes_nothing(
    world: tuple[Cmcd, Sink], driver: WebDriver
) -> None:
    d, sink = world
    # acme's data: a user, a key, a delivered message, a block
    d.admin("user.add", tenant="acme", login="acme-secret-user", role="viewer", password="acme secret user pw")
    key = d.admin("apikey.add", tenant="acme", login="alice")
    d.admin("suppression.add", tenant="acme", address="acme-blocked@dst.test")
    status, _, reply = d.http("POST", "/v1/emails", {"from": "alice@acme.test", "to": ["acme-only@dst.test"],
                              "subject": "acme", "text": "acme"}, token=key["token"])  # fmt: skip
    assert status == 202
    wait_until(lambda: any(r["queue_id"] == reply["id"] and r["event"] == "delivered" for r in d.mail_log()),
               "acme's message delivered", 30)  # fmt: skip
    acme_marks = ("acme-secret-user", key["key_id"], reply["id"], "acme-only@dst.test", "acme-blocked@dst.test",
                  "acme.test", "alice")  # fmt: skip
    password, totp = admin_with_totp(d, "beta", "beta-day-admin")
    sign_in(driver, d, "beta-day-admin", password, totp)
    for page_path in (*MAIN_PAGES[:5], *MAIN_PAGES[6:], "/mail.csv", "/blocks.csv", "/logins.csv", "/ops.csv"):
        if page_path.endswith(".csv"):
            continue  # downloads: checked below through the same session's cookie
        driver.get(base(d) + page_path)
        text = driver.page_source
        assert not [m for m in acme_marks if m in text], (page_path, [m for m in acme_marks if m in text])
    driver.get(base(d) + f"/mail/{reply['id']}")
    assert "no such page or item" in driver.find_element(By.TAG_NAME, "main").text
    driver.get(base(d) + "/domains/acme.test")
    assert "no such page or item" in driver.find_element(By.TAG_NAME, "main").text
    session = {c["name"]: c["value"] for c in driver.get_cookies()}["__Host-cmcd_session"]
    b = ConsoleClient(d.api_port, d.client_context())
    b.jar.set_cookie(_cookie("__Host-cmcd_session", session))
    for csv_path in ("/mail.csv?since=2000-01-01T00:00", "/blocks.csv", "/logins.csv?since=2000-01-01T00:00",
                     "/ops.csv?since=2000-01-01T00:00"):  # fmt: skip
        got = b.get(csv_path)
        assert got.status == 200 and not [m for m in acme_marks if m in got.text], csv_path

    # forged forms: one without a token, one with the token of a session that ended; neither adds a user
    users_before = d.admin("user.list", tenant="beta")
    driver.get(base(d) + "/users")
    old_token = driver.find_element(By.CSS_SELECTOR, 'form[action="/users"] input[name="csrf"]').get_attribute("value")
    forge = """
        const f = document.createElement('form'); f.method = 'post'; f.action = '/users';
        for (const [k, v] of Object.entries(arguments[0])) {
            const i = document.createElement('input'); i.type = 'hidden'; i.name = k; i.value = v; f.appendChild(i);
        }
        document.body.appendChild(f); f.submit();
    """
    driver.execute_script(forge, {"login": "forged-one", "role": "admin"})
    wait_until(lambda: "did not come from this console" in driver.find_element(By.TAG_NAME, "main").text,
               "the refusal of a form without a token", 30)  # fmt: skip
    other_password, other_totp = admin_with_totp(d, "beta", "beta-other-admin")
    users_before = d.admin("user.list", tenant="beta")
    driver.get(base(d) + "/users")
    press(driver, "/logout")
    wait_page(driver, "/login")
    sign_in(driver, d, "beta-other-admin", other_password, other_totp)
    driver.execute_script(forge, {"login": "forged-two", "role": "admin", "csrf": old_token})
    wait_until(lambda: "did not come from this console" in driver.find_element(By.TAG_NAME, "main").text,
               "the refusal of a form with an ended session's token", 30)  # fmt: skip
    assert d.admin("user.list", tenant="beta") == users_before
