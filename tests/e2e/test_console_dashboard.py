"""The console's dashboard and "Contact the operator" page over real HTTPS on loopback, with
delivery on to a sink: the dashboard's numbers are the mail log's for the signed-in tenant only,
drawn as one SVG bar per count and listed in a table; the tenant's queue is counted over every
worker's spool shard; an inquiry is recorded in the operation log and mailed to the operator
(queued in the spool, delivered to the sink); forged and bad forms change nothing."""

from __future__ import annotations

import collections
import datetime
import email
import email.policy
import html.parser
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from cmcd.api.console.contact import USER_LIMIT
from tests.conftest import Cmcd, wait_until
from tests.console_client import ConsoleClient, Reply
from tests.e2e.test_console import Person, World
from tests.peers import Sink

EVENTS = ("accepted", "delivered", "deferred", "bounced", "suppressed")
OPERATOR = "ops@operator.test"


@dataclass
class Dash:
    w: World
    sink: Sink
    keys: dict[str, str]  # tenant -> a sender's API key

    @property
    def d(self) -> Cmcd:
        return self.w.d

    def send(self, tenant: str, to: list[str], subject: str = "dashboard test") -> str:
        sender = {"acme": "alice@acme.test", "beta": "bob@beta.test"}[tenant]
        status, _, reply = self.d.http("POST", "/v1/emails", {"from": sender, "to": to, "subject": subject,
                                                              "text": "Hello."}, token=self.keys[tenant])  # fmt: skip
        assert status == 202, reply
        return str(reply["id"])


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory, ca: Any) -> Iterator[Dash]:
    sink = Sink().start()
    d = Cmcd(
        tmp_path_factory.mktemp("console-dashboard"),
        ca,
        {
            "api": {"listen": "127.0.0.1:0"},
            "server": {"operator_address": OPERATOR},
            # closed.test: held at a closed port, its mail stays deferred
            "delivery": {"enabled": True, "routes": {"*": f"127.0.0.1:{sink.port}", "closed.test": "127.0.0.1:9"}},
        },
    )
    d.start().provision()
    w = World(d, Person("acme", "", ""), Person("beta", "", ""))
    w.acme_admin = w.person("acme", "admin")
    w.beta_admin = w.person("beta", "admin")
    keys = {t: str(d.admin("apikey.add", tenant=t, login=login)["token"]) for t, login in (("acme", "alice"),
                                                                                          ("beta", "bob"))}  # fmt: skip
    yield Dash(w, sink, keys)
    d.stop()
    sink.stop()


# -- reading pages ----------------------------------------------------------------------------------


class _Tables(html.parser.HTMLParser):
    """Each <table id=...>'s rows as lists of cell texts, by section (thead, tbody, tfoot)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, dict[str, list[list[str]]]] = {}
        self._table: str | None = None
        self._section = "tbody"
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id") or ""
            self.tables[self._table] = {"thead": [], "tbody": [], "tfoot": []}
        elif self._table is None:
            return
        elif tag in ("thead", "tbody", "tfoot"):
            self._section = tag
        elif tag == "tr":
            self.tables[self._table][self._section].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None
        elif tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][self._section][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None


def _tables(page: Reply) -> dict[str, dict[str, list[list[str]]]]:
    parser = _Tables()
    parser.feed(page.text)
    return parser.tables


def _text(reply: Reply) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", reply.text))


def _totals(page: Reply) -> dict[str, int]:
    """The dashboard table's totals row, by event."""
    row = _tables(page)["mail-counts"]["tfoot"][0]
    return dict(zip(EVENTS, map(int, row[1:]), strict=True))


def _queue(page: Reply) -> dict[str, int]:
    """The "Queue now" table: state label -> recipients (and "Total")."""
    t = _tables(page)["queue-states"]
    return {row[0]: int(row[1]) for row in t["tbody"] + t["tfoot"]}


def _logged(d: Cmcd, tenant_id: int) -> dict[str, int]:
    """What the mail log holds for TENANT_ID, by event (everything is within the last 24 hours)."""
    got = collections.Counter(r["event"] for r in d.mail_log() if r["tenant_id"] == tenant_id)
    return {e: got.get(e, 0) for e in EVENTS}


def _tenant_id(d: Cmcd, queue_id: str) -> int:
    rows = wait_until(lambda: d.mail_log(queue_id), f"{queue_id} in the mail log")
    return int(rows[0]["tenant_id"])


# -- the dashboard ---------------------------------------------------------------------------------


def test_dashboard_counts_are_the_mail_logs_for_the_tenant_only(dash: Dash) -> None:
    d, sink = dash.d, dash.sink
    before = len(sink.messages)
    acme_ids = [dash.send("acme", ["a1@dst.test", "a2@dst.test"]), dash.send("acme", ["a3@other.test"]),
                dash.send("acme", ["a4@dst.test"])]  # fmt: skip
    beta_ids = [dash.send("beta", ["b1@dst.test"])]
    sink.wait_for(before + 4, 30)
    acme, beta = _tenant_id(d, acme_ids[0]), _tenant_id(d, beta_ids[0])
    wait_until(lambda: _logged(d, acme)["delivered"] >= 4 and _logged(d, beta)["delivered"] >= 1,
               "every delivery in the mail log")  # fmt: skip
    a = dash.w.signed_in(dash.w.acme_admin)
    b = dash.w.signed_in(dash.w.beta_admin)

    def same(browser: ConsoleClient, tenant_id: int) -> Reply | None:
        page = browser.get("/?range=24h")
        assert page.status == 200, page.text[:500]
        return page if _totals(page) == _logged(d, tenant_id) else None

    page = wait_until(lambda: same(a, acme), "acme's dashboard shows acme's mail log")
    totals = _totals(page)
    assert totals["accepted"] >= 4 and totals["delivered"] >= 4
    beta_page = wait_until(lambda: same(b, beta), "beta's dashboard shows beta's mail log")
    assert _totals(beta_page)["accepted"] < totals["accepted"]  # acme's mail is not in beta's counts

    # the chart: inline SVG, one bar per count that is not zero, its hover title the table's cell
    table = _tables(page)["mail-counts"]
    assert len(table["tbody"]) == 24  # the last 24 hours, per hour
    labels = table["thead"][0][1:]
    cells = sorted(f"{row[0]} · {label}: {n}" for row in table["tbody"] for label, n in zip(labels, row[1:], strict=True)
                   if n != "0")  # fmt: skip
    svg = re.search(r"<svg [^>]*>.*?</svg>", page.text, re.S)
    assert svg is not None and 'role="img"' in svg.group(0) and "<desc>" in svg.group(0)
    bars = re.findall(r'<rect class="bar bar-(\w+)"[^>]*><title>([^<]*)</title>', svg.group(0))
    assert sorted(title for _, title in bars) == cells and len(cells) >= 2
    assert {kind for kind, _ in bars} >= {"accepted", "delivered"}
    assert " style=" not in page.text and "<script>" not in page.text


def test_a_deferred_message_shows_in_the_tenants_queue_only(dash: Dash) -> None:
    dash.send("acme", ["stuck@closed.test"])
    a = dash.w.signed_in(dash.w.person("acme", "viewer"))  # a viewer reads the dashboard too
    queue = wait_until(
        lambda: (q := _queue(a.get("/")))["Deferred (will be retried)"] >= 1 and q,
        "the deferred recipient in acme's queue",
        timeout=30,
    )
    assert queue["Total"] >= 1
    b = dash.w.signed_in(dash.w.beta_admin)
    assert _queue(b.get("/"))["Deferred (will be retried)"] == 0  # not beta's


def test_ranges_per_day_and_typed_ranges(dash: Dash) -> None:
    a = dash.w.signed_in(dash.w.acme_admin)
    week = a.get("/?range=7d")
    assert week.status == 200 and len(_tables(week)["mail-counts"]["tbody"]) == 7
    month = a.get("/?range=30d")
    assert len(_tables(month)["mail-counts"]["tbody"]) == 30
    assert _totals(month)["accepted"] >= _totals(week)["accepted"] > 0
    today = datetime.datetime.now(datetime.UTC)  # the tenants' time zone is the server's: UTC
    since = (today - datetime.timedelta(days=2)).strftime("%Y-%m-%dT00:00")
    typed = a.get(f"/?range=custom&since={since}&unit=day")
    assert typed.status == 200 and len(_tables(typed)["mail-counts"]["tbody"]) == 3
    assert _totals(typed)["accepted"] == _totals(week)["accepted"]
    hourly = a.get(f"/?range=custom&since={since}&unit=hour")
    assert hourly.status == 200 and 49 <= len(_tables(hourly)["mail-counts"]["tbody"]) <= 72
    too_long = a.get("/?range=custom&since=2020-01-01T00:00&unit=hour")
    assert too_long.status == 400 and "at most 750 can be shown" in _text(too_long)
    assert "mail-counts" not in _tables(too_long)
    backwards = a.get(f"/?range=custom&since={since}&until=2020-01-01T00:00")
    assert backwards.status == 400 and "after it starts" in _text(backwards)
    ancient = a.get("/?range=custom&since=1900-01-01T00:00&until=1900-01-02T00:00&unit=day")
    assert ancient.status == 400 and "between 1970 and 2100" in _text(ancient)
    garbage = a.get("/?range=custom&since=yesterday")
    assert garbage.status == 400 and "enter a time like" in _text(garbage)
    ja = dash.w.signed_in(dash.w.acme_admin, lang="ja")
    assert "ダッシュボード" in ja.get("/").text and "配信" in ja.get("/").text


# -- contact the operator ---------------------------------------------------------------------------


def _from_operator_mail(sink: Sink, subject: str) -> list[email.message.EmailMessage]:
    found = []
    for m in list(sink.messages):
        parsed = email.message_from_bytes(m.data, policy=email.policy.default)
        if m.rcpt_tos == [OPERATOR] and subject in str(parsed["Subject"]):
            found.append(parsed)  # type: ignore[arg-type]
    return found


def test_an_inquiry_is_recorded_and_mailed_to_the_operator(dash: Dash) -> None:
    d, sink = dash.d, dash.sink
    viewer = dash.w.person("acme", "viewer")
    b = dash.w.signed_in(viewer)
    form = b.get("/contact")
    assert form.status == 200 and "goes to the operator of this service by mail" in _text(form)
    subject = "Please raise our daily quota ✓"
    text = "Hello,\r\nwe send more in December.\r\n<b>not markup</b> & thanks — 日本語も"
    sent = b.submit(form, "/contact", subject=subject, message=text)
    assert sent.status == 303 and sent.location == "/contact?done=contact_sent"
    assert "Your message was sent to the operator." in _text(b.get(sent.location))
    row = wait_until(
        lambda: next((r for r in d.ops_log() if r["action"] == "console.contact" and r["detail"] == subject), None),
        "the inquiry in the operation log",
    )
    assert row["actor"].startswith(f"console:{viewer.login} (") and row["result"] == "ok"
    mail = wait_until(lambda: _from_operator_mail(sink, subject), "the inquiry at the operator's address", 30)[0]
    assert str(mail["From"]).endswith("<ops@operator.test>") and mail["Reply-To"] is None
    assert f"{viewer.login}" in mail.get_content()
    body = mail.get_content()
    assert text.replace("\r\n", "\n") in body.replace("\r\n", "\n")
    assert "Tenant:    acme" in body and f"Login:     {viewer.login} (viewer)" in body and "127.0.0.1" in body
    received = next(m for m in sink.messages if m.rcpt_tos == [OPERATOR])
    assert received.mail_from == ""  # as a DSN: nothing bounces back to a login
    logged = wait_until(lambda: d.mail_log(row["target"]), "the inquiry in acme's mail log")
    assert logged[0]["tenant_id"] == row["tenant_id"] and logged[0]["event"] == "accepted"  # acme's mail log


def test_bad_and_forged_inquiries_send_nothing(dash: Dash) -> None:
    d, sink = dash.d, dash.sink
    b = dash.w.signed_in(dash.w.person("acme", "admin"))
    form = b.get("/contact")
    empty = b.submit(form, "/contact", subject="Forged or bad 1", message="  ")
    assert empty.status == 400 and "Enter your message." in _text(empty)
    assert 'value="Forged or bad 1"' in empty.text  # the form comes back as typed
    two_lines = b.submit(form, "/contact", subject="Forged or bad 2\r\nBcc: x@evil.test", message="hi")
    assert two_lines.status == 400 and "one line" in _text(two_lines)
    too_long = b.submit(form, "/contact", subject="Forged or bad 3", message="x" * 5001)
    assert too_long.status == 400 and "5001 characters" in _text(too_long)
    no_token = b.post("/contact", {"subject": "Forged or bad 4", "message": "no token"})
    assert no_token.status == 403
    other = dash.w.signed_in(dash.w.beta_admin)
    foreign = b.post("/contact", {"subject": "Forged or bad 5", "message": "another session's token",
                                  "csrf": other.get("/contact").form("/contact").fields["csrf"]})  # fmt: skip
    assert foreign.status == 403
    # a good one after them: once it is in, any of them would be too (each was answered before it)
    good = b.submit(form, "/contact", subject="After the bad ones", message="This one is real.")
    assert good.status == 303
    wait_until(lambda: _from_operator_mail(sink, "After the bad ones"), "the good inquiry at the operator", 30)
    assert not _from_operator_mail(sink, "Forged or bad")
    assert not [r for r in d.ops_log() if r["action"] == "console.contact" and "Forged or bad" in r["detail"]]


def test_without_an_operator_address_inquiries_are_recorded_only(
    tmp_path_factory: pytest.TempPathFactory, ca: Any
) -> None:
    d = Cmcd(tmp_path_factory.mktemp("console-contact"), ca, {"api": {"listen": "127.0.0.1:0"}})
    d.start().provision()
    try:
        w = World(d, Person("acme", "", ""), Person("beta", "", ""))
        b = w.signed_in(w.person("acme", "viewer"))
        form = b.get("/contact")
        assert "Inquiries are recorded for the operator only" in _text(form)
        sent = b.submit(form, "/contact", subject="Recorded only", message="Is anyone there?")
        assert sent.status == 303
        row = wait_until(
            lambda: next((r for r in d.ops_log() if r["action"] == "console.contact"), None), "the inquiry recorded"
        )
        assert row["detail"] == "Recorded only" and row["target"] == "operator"
        assert d.spooled() == {}  # nothing queued (delivery is off: it would still be there)
    finally:
        d.stop()


def test_inquiries_are_limited_per_user(dash: Dash) -> None:
    b = dash.w.signed_in(dash.w.person("acme", "viewer"))
    form = b.get("/contact")
    for n in range(USER_LIMIT):
        assert b.submit(form, "/contact", subject=f"Limited {n}", message="one of a few").status == 303
    over = b.submit(form, "/contact", subject="Limited over", message="one too many")
    assert over.status == 429 and "within the hour" in _text(over)
    wait_until(lambda: _from_operator_mail(dash.sink, f"Limited {USER_LIMIT - 1}"), "the last allowed inquiry", 30)
    assert not _from_operator_mail(dash.sink, "Limited over")
    assert not [r for r in dash.w.d.ops_log() if r["action"] == "console.contact" and r["detail"] == "Limited over"]
