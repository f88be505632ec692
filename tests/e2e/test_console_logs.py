"""The console's log pages over real HTTPS, as a person uses them: the mail log (search, one
message's history, the CSV of a whole selection streamed over several store pages), the login log
and the operation log with their CSVs; and that acme never sees a row of beta's, nor learns that
one of beta's queue ids exists."""

from __future__ import annotations

import csv
import html.parser
import io
import re
import socket
import ssl
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import Cmcd, message, wait_until
from tests.console_client import ConsoleClient, Reply
from tests.e2e.test_console import Person, World
from tests.peers import Sink

MAIL_COLUMNS = [
    "time", "queue_id", "event", "status", "sender", "recipient", "domain", "response", "bounce_class", "attempt", "mx",
    "ip", "tls", "delay", "size", "message_id", "tags", "stream",
]  # fmt: skip
BULK = 150  # recipients of the bulk message: 300 mail-log rows, three of the console's pages
SINK_REPLY = "250 2.0.0 OK queued as SINK"


@dataclass
class Logs:
    w: World
    sink: Sink
    acme_key: str  # alice's API key (sender)
    acme_admin_key: str
    beta_key: str
    beta_admin_key: str
    welcome: str  # acme's queue id: to one@dst.test, tag welcome
    invoice: str  # acme's queue id: to two@dst.test, tag invoice
    theirs: str  # beta's queue id: to one@dst.test, tag welcome

    @property
    def d(self) -> Cmcd:
        return self.w.d

    def viewer(self, tenant: str = "acme") -> ConsoleClient:
        return self.w.signed_in(self.w.person(tenant, "viewer"))


def _send(d: Cmcd, key: str, sender: str, to: str, tag: str) -> str:
    body = {"from": sender, "to": [to], "subject": f"about {tag}", "text": "hello", "tags": [tag]}
    status, _, reply = d.http("POST", "/v1/emails", body, token=key)
    assert status == 202, reply
    return str(reply["id"])


def _delivered(d: Cmcd, queue_ids: set[str], timeout: float = 30) -> None:
    d.wait_mail_log(lambda rows: {r["queue_id"] for r in rows if r["event"] == "delivered"} >= queue_ids,
                    timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, ca: Any) -> Iterator[Logs]:
    """A daemon delivering to a sink; acme sent two messages (tags welcome, invoice), beta one to
    the same recipient as acme's first, with acme's tag; all delivered."""
    sink = Sink().start()
    d = Cmcd(
        tmp_path_factory.mktemp("console-logs"),
        ca,
        {
            "api": {"listen": "127.0.0.1:0"},
            "delivery": {"enabled": True, "routes": {"*": f"127.0.0.1:{sink.port}"}, "retry_schedule": ["1s"]},
        },
    )
    d.start().provision()
    try:
        w = World(d, Person("acme", "", ""), Person("beta", "", ""))
        w.acme_admin = w.person("acme", "admin")
        w.beta_admin = w.person("beta", "admin")
        keys = {
            name: str(d.admin("apikey.add", tenant=tenant, login=login)["token"])
            for name, tenant, login in (("acme", "acme", "alice"), ("acme-admin", "acme", w.acme_admin.login),
                                        ("beta", "beta", "bob"), ("beta-admin", "beta", w.beta_admin.login))
        }  # fmt: skip
        welcome = _send(d, keys["acme"], "alice@acme.test", "one@dst.test", "welcome")
        invoice = _send(d, keys["acme"], "alice@acme.test", "two@dst.test", "invoice")
        theirs = _send(d, keys["beta"], "bob@beta.test", "one@dst.test", "welcome")
        _delivered(d, {welcome, invoice, theirs})
        yield Logs(w, sink, keys["acme"], keys["acme-admin"], keys["beta"], keys["beta-admin"], welcome, invoice,
                   theirs)  # fmt: skip
    finally:
        d.stop()
        sink.stop()


# -- reading pages as a person does ---------------------------------------------------------------


class _Table(html.parser.HTMLParser):
    """The cells' text of each row of a page's <tbody>, and the links in them."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.links: list[str] = []
        self._in_body = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tbody":
            self._in_body = True
        elif self._in_body and tag == "tr":
            self.rows.append([])
        elif self._in_body and tag == "td":
            self._cell = []
        elif self._in_body and tag == "a":
            self.links.append(dict(attrs).get("href") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "tbody":
            self._in_body = False
        elif tag == "td" and self._cell is not None:
            self.rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _table(reply: Reply) -> list[list[str]]:
    parser = _Table()
    parser.feed(reply.text)
    return parser.rows


def _text(reply: Reply) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", reply.text))


def _search(b: ConsoleClient, path: str, **values: str) -> Reply:
    """Fill in PATH's search form (a GET form: the search is a URL) as a person would, and send it."""
    form = b.get(path).form(path)
    assert form.method == "get"
    # ConsoleClient's form parser takes the option after a selected one whose value is "" (the
    # "any" choice of the event and result selects); a browser sends "": say so here
    anything = {name: "" for name in ("status", "result") if name in form.fields}
    got = b.get(path + "?" + urllib.parse.urlencode(form.fields | anything | values))
    assert got.status == 200, got.text[:1000]
    return got


def _next_link(reply: Reply) -> str:
    found = re.search(r'<a href="([^"]+)" rel="next">', reply.text)
    return found.group(1).replace("&amp;", "&") if found else ""


def _csv(b: ConsoleClient, path: str) -> tuple[Reply, list[dict[str, str]]]:
    got = b.get(path)
    assert got.status == 200, got.text[:1000]
    assert got.headers["Content-Type"].startswith("text/csv")
    return got, list(csv.DictReader(io.StringIO(got.text)))


# Mail log columns on the search page: time, queue id, event, sender, recipient, response, bounce class, tls, delay,
# tags
QID, EVENT, SENDER, RCPT, RESPONSE, CLASS, TAGS = 1, 2, 3, 4, 5, 6, 9


# -- the mail log ---------------------------------------------------------------------------------


def test_the_mail_log_shows_the_delivered_row(world: Logs) -> None:
    b = world.viewer()
    page = b.get("/mail")
    assert page.status == 200 and "Mail log" in page.text
    rows = _table(page)
    delivered = [r for r in rows if r[QID] == world.welcome and r[EVENT] == "delivered"]
    assert len(delivered) == 1
    row = delivered[0]
    assert row[SENDER] == "alice@acme.test" and row[RCPT] == "one@dst.test"
    assert row[RESPONSE].startswith(SINK_REPLY) and row[TAGS] == "welcome" and row[CLASS] == ""
    assert f'href="/mail/{world.welcome}"' in page.text  # the queue id opens its history
    assert {r[QID] for r in rows} == {world.welcome, world.invoice}  # nothing of beta's
    assert world.theirs not in page.text
    ja = world.w.signed_in(world.w.person("acme", "viewer"), lang="ja")
    assert "配信済み" in ja.get("/mail").text


def test_each_search_field_narrows_the_mail_log(world: Logs) -> None:
    b = world.viewer()
    by_rcpt = _table(_search(b, "/mail", recipient="one@dst.test"))
    assert by_rcpt and {r[QID] for r in by_rcpt} == {world.welcome}  # not beta's mail to the same address
    by_sender = _table(_search(b, "/mail", sender="bob@beta.test"))
    assert by_sender == []  # another tenant's sender finds nothing
    by_status = _table(_search(b, "/mail", status="delivered"))
    assert {r[EVENT] for r in by_status} == {"delivered"} and {r[QID] for r in by_status} == {
        world.welcome, world.invoice}  # fmt: skip
    accepted = _table(_search(b, "/mail", status="accepted", tag="invoice"))
    assert [(r[QID], r[EVENT]) for r in accepted] == [(world.invoice, "accepted")]
    by_tag = _table(_search(b, "/mail", tag="welcome"))
    assert by_tag and {r[QID] for r in by_tag} == {world.welcome}
    by_queue_id = _table(_search(b, "/mail", queue_id=world.invoice))
    assert sorted(r[EVENT] for r in by_queue_id) == ["accepted", "delivered"]
    assert {r[QID] for r in by_queue_id} == {world.invoice}
    assert _table(_search(b, "/mail", queue_id=world.theirs)) == []
    assert _table(_search(b, "/mail", since="2999-01-01T00:00")) == []  # a window with nothing in it
    bad = b.get("/mail?since=yesterday")
    assert bad.status == 400 and "enter a time like" in _text(bad)
    assert b.get("/mail?status=opened").status == 400
    assert b.get("/mail?cursor=not-a-cursor").status == 400


def test_one_message_history_shows_every_event_and_the_remote_reply(world: Logs) -> None:
    b = world.viewer()
    page = b.get(f"/mail/{world.welcome}")
    assert page.status == 200, page.text[:500]
    rows = _table(page)
    # time, event, recipient, attempt, mx, ip, tls, remote reply, bounce class, delay, size, message id
    assert [r[1] for r in rows] == ["accepted", "delivered"]
    delivered = rows[1]
    assert delivered[2] == "one@dst.test" and delivered[3] == "1" and delivered[5] == "127.0.0.1"
    assert delivered[7].startswith(SINK_REPLY)
    stored = [r for r in world.d.mail_log(world.welcome) if r["event"] == "delivered"][0]
    assert delivered[7] == stored["response"] and delivered[8] == "" and delivered[11] == stored["message_id"]
    assert "alice@acme.test" in _text(page) and "welcome" in _text(page)


def test_another_tenants_queue_id_is_not_found(world: Logs) -> None:
    b = world.viewer()
    theirs = b.get(f"/mail/{world.theirs}")
    nowhere = b.get("/mail/0000000000000000")
    assert theirs.status == nowhere.status == 404
    assert _text(theirs) == _text(nowhere)  # the same page: nothing says it exists elsewhere
    assert "alice" not in theirs.text and "bob@beta.test" not in theirs.text
    # beta sees its own, and none of acme's
    beta = world.viewer("beta")
    assert beta.get(f"/mail/{world.theirs}").status == 200
    assert beta.get(f"/mail/{world.welcome}").status == 404
    _, rows = _csv(beta, "/mail.csv?since=")
    assert {r["queue_id"] for r in rows} == {world.theirs}


def test_the_csv_is_exactly_the_selection_streamed_over_several_pages(world: Logs) -> None:
    d = world.d
    body = {
        "from": "alice@acme.test",
        "subject": "Hi {{name}}",
        "text": "Dear {{name}}",
        "recipients": [{"to": f"user{i}@bulk.test", "merge": {"name": f"User {i}"}} for i in range(BULK)],
        "tags": ["bulk150"],
    }
    status, _, reply = d.http("POST", "/v1/emails/bulk", body, token=world.acme_key)
    assert status == 202, reply
    ids = {m["id"] for m in reply["messages"]}
    assert len(ids) == BULK
    _delivered(d, ids, timeout=90)
    b = world.viewer()

    got, rows = _csv(b, "/mail.csv?" + urllib.parse.urlencode({"since": "", "tag": "bulk150"}))
    assert "attachment" in got.headers["Content-Disposition"] and ".csv" in got.headers["Content-Disposition"]
    assert got.headers.get("Transfer-Encoding") == "chunked"  # written as read: no length known up front
    assert got.headers["Cache-Control"] == "no-store" and got.headers["X-Content-Type-Options"] == "nosniff"
    assert got.text.splitlines()[0].split(",") == MAIL_COLUMNS
    stored = [r for r in d.mail_log() if r["queue_id"] in ids]
    assert len(rows) == len(stored) == 2 * BULK  # accepted and delivered, each recipient, over 3+ store reads
    assert sorted((r["queue_id"], r["event"], r["recipient"]) for r in rows) == sorted(
        (r["queue_id"], r["event"], r["rcpt"]) for r in stored)  # fmt: skip
    assert {r["tags"] for r in rows} == {"bulk150"} and {r["sender"] for r in rows} == {"alice@acme.test"}
    _, delivered = _csv(b, "/mail.csv?" + urllib.parse.urlencode({"since": "", "tag": "bulk150",
                                                                    "status": "delivered"}))  # fmt: skip
    assert len(delivered) == BULK and {r["event"] for r in delivered} == {"delivered"}
    assert all(r["response"].startswith(SINK_REPLY) for r in delivered)

    # the whole of acme's log: every acme row and none of beta's
    _, everything = _csv(b, "/mail.csv?since=")
    acme_id = next(r["tenant_id"] for r in d.mail_log(world.welcome))
    acme_rows = [r for r in d.mail_log() if r["tenant_id"] == acme_id]
    assert len(everything) == len(acme_rows)
    assert world.theirs not in {r["queue_id"] for r in everything}
    assert "bob@beta.test" not in got.text

    # the page shows the same selection 100 rows at a time, each "next page" link going on
    page = _search(b, "/mail", tag="bulk150")
    seen: list[tuple[str, str, str]] = []
    pages = 0
    while True:
        pages += 1
        table = _table(page)
        assert len(table) <= 100
        seen += [(r[QID], r[EVENT], r[RCPT]) for r in table]
        link = _next_link(page)
        if not link:
            break
        page = b.get(link)
        assert page.status == 200
    assert pages >= 3 and len(seen) == len(set(seen)) == 2 * BULK
    # the search page's CSV link carries the same selection
    csv_link = re.search(r'<a href="(/mail\.csv\?[^"]+)"', _search(b, "/mail", tag="bulk150").text)
    assert csv_link is not None
    _, linked = _csv(b, csv_link.group(1).replace("&amp;", "&"))
    assert len(linked) == 2 * BULK
    assert not [line for line in d.log if "Traceback" in line or "Error handling request" in line]


def test_csv_needs_a_sign_in(world: Logs) -> None:
    anonymous = world.w.browser()
    for path in ("/mail.csv", "/logins.csv", "/ops.csv", "/mail", f"/mail/{world.welcome}"):
        got = anonymous.get(path)
        assert got.status == 303 and got.location.startswith("/login?")


# -- the login log and the operation log ----------------------------------------------------------


def test_the_login_log_shows_a_console_sign_in_and_a_failed_one(world: Logs) -> None:
    person = world.w.person("acme", "viewer")
    wrong = world.w.browser()
    refused = wrong.submit(wrong.get("/login"), "/login", login=person.login, password="not the password")
    assert refused.status == 401
    b = world.w.signed_in(person)
    world.w.signed_in(world.w.person("beta", "admin"))  # beta's sign-in, never in acme's log
    wait_until(lambda: any(r["login"] == person.login and r["result"] == "ok" for r in world.d.login_log()),
               "the sign-in in the login log")  # fmt: skip
    # login, client IP, mechanism, result, detail after the time
    rows = [r for r in _table(b.get("/logins")) if r[1] == person.login]
    assert ["127.0.0.1", "CONSOLE", "succeeded"] in [r[2:5] for r in rows]
    assert ["127.0.0.1", "CONSOLE", "failed"] in [r[2:5] for r in rows]
    failed = _table(_search(b, "/logins", result="fail"))
    assert failed and {r[4] for r in failed} == {"failed"}
    assert any(r[1] == person.login and r[5] == "bad password" for r in failed)
    everyone = {r[1] for r in _table(b.get("/logins"))}
    assert not any(login.startswith("beta-") for login in everyone)

    got, rows_csv = _csv(b, "/logins.csv?since=")
    assert "attachment" in got.headers["Content-Disposition"]
    assert got.text.splitlines()[0].split(",") == ["time", "login", "client_ip", "mechanism", "result", "detail"]
    mine = [r for r in rows_csv if r["login"] == person.login]
    assert {(r["mechanism"], r["result"]) for r in mine} == {("CONSOLE", "ok"), ("CONSOLE", "fail")}
    assert not any(r["login"].startswith("beta-") for r in rows_csv)
    _, only_failed = _csv(b, "/logins.csv?since=&result=fail")
    assert only_failed and {r["result"] for r in only_failed} == {"fail"}


def test_the_operation_log_shows_a_change_and_filters_it(world: Logs) -> None:
    d = world.d
    status, _, _ = d.http("POST", "/v1/users", {"login": "acme-ops-probe", "role": "viewer"},
                          token=world.acme_admin_key)  # fmt: skip
    assert status == 201
    status, _, _ = d.http("POST", "/v1/users", {"login": "acme-ops-probe", "role": "viewer"},
                          token=world.acme_admin_key)  # fmt: skip
    assert status == 409  # refused: on record as refused
    status, _, _ = d.http("POST", "/v1/users", {"login": "beta-ops-probe", "role": "viewer"},
                          token=world.beta_admin_key)  # fmt: skip
    assert status == 201
    wait_until(lambda: sum(1 for r in d.ops_log() if r["target"] == "acme-ops-probe") == 2, "the changes on record")
    b = world.viewer()
    # time, who, action, target, result, detail
    rows = _table(b.get("/ops"))
    probe = [r for r in rows if r[3] == "acme-ops-probe"]
    assert [(r[2], r[4]) for r in probe] == [("api.users.add", "succeeded"), ("api.users.add", "refused")]
    assert probe[0][1].startswith(f"api:{world.w.acme_admin.login}")
    assert not any("beta-ops-probe" in cell for r in rows for cell in r)
    assert any(r[2] == "user.add" for r in rows)  # the operator's cmcctl user.add of acme's users
    by_action = _table(_search(b, "/ops", action="api.users"))
    assert by_action and {r[2] for r in by_action} == {"api.users.add"}
    refused = _table(_search(b, "/ops", result="refused"))
    assert [(r[3], r[4]) for r in refused] == [("acme-ops-probe", "refused")]

    got, rows_csv = _csv(b, "/ops.csv?since=")
    assert "attachment" in got.headers["Content-Disposition"]
    assert got.text.splitlines()[0].split(",") == ["time", "actor", "action", "target", "result", "detail"]
    assert [(r["action"], r["result"]) for r in rows_csv if r["target"] == "acme-ops-probe"] == [
        ("api.users.add", "ok"), ("api.users.add", "refused")]  # fmt: skip
    assert "beta-ops-probe" not in got.text
    _, filtered = _csv(b, "/ops.csv?since=&action=api.users&result=ok")
    assert [r["target"] for r in filtered] == ["acme-ops-probe"]


# -- a download nobody reads ----------------------------------------------------------------------

WRITE_TIMEOUT_S = 2.0


def test_a_csv_download_nobody_reads_is_cut_off_by_the_write_timeout(make_cmcd: Any) -> None:
    """The CSV is written as the store is read, inside the API's write timer: a browser that stops
    reading a large download is reset after api.write_timeout instead of holding its handler."""
    d = make_cmcd({"api": {"listen": "127.0.0.1:0", "write_timeout": f"{WRITE_TIMEOUT_S}s"}})
    local = "r" * 58  # long addresses (64 octets with the six digits): a few hundred bytes a CSV row, a few MB in all
    with d.smtp() as c:
        for m in range(120):
            c.sendmail("alice@acme.test", [f"{local}{m:03d}{i:03d}@{'d' * 50}.dst.test" for i in range(100)],
                       message())  # fmt: skip
    d.wait_mail_log(lambda rows: len(rows) >= 12_000, timeout=120)
    w = World(d, Person("acme", "", ""), Person("beta", "", ""))
    b = w.signed_in(w.person("acme", "viewer"))
    session = b.cookie("__Host-cmcd_session")
    assert session is not None
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # a small window from the start
    raw.bind(("127.0.0.9", 0))
    raw.connect(("127.0.0.1", d.api_port))
    raw.settimeout(10)
    stalled = d.client_context().wrap_socket(raw, server_hostname="127.0.0.1")
    try:
        stalled.sendall(f"GET /mail.csv?since= HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {session.name}={session.value}"
                        "\r\n\r\n".encode())  # fmt: skip
        # never read: the daemon resets the connection once the client has taken nothing for the timeout
        line = d.wait_log(r"event=api_write_timeout client_ip=127\.0\.0\.9 method=GET path=/mail\.csv", timeout=60)
    finally:
        try:
            stalled.close()
        except (OSError, ssl.SSLError):
            pass
    stalled_s = float(re.search(r"stalled_s=([\d.]+)", line).group(1))  # type: ignore[union-attr]
    assert WRITE_TIMEOUT_S <= stalled_s <= WRITE_TIMEOUT_S * 1.25 + 0.5
    # the daemon serves the next download whole
    _, rows = _csv(b, "/mail.csv?since=")
    assert len(rows) == 12_000
