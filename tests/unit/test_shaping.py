"""Provider shaping's pure parts as tables: MX suffix matching, the files (shipped, override, refusals
naming file and entry), the automation state machine on a fake clock, the worker shares, and a
provider site's ready queue (next hops, limits, holds)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cmcd import shaping
from cmcd.deliver.ready import ReadyQueue
from cmcd.deliver.routing import Host, Route
from cmcd.queue.work import Due, Job
from cmcd.shaping import Automation, Limits, Provider, Rule, Shaping, ShapingError
from cmcd.shares import share_shaping

SHIPPED = shaping.load_shaping()


def provider(name: str, *suffixes: str, connection_limit: int = 4) -> Provider:
    return Provider(name, suffixes, Limits(connection_limit=connection_limit, rate=(8.0, 1.0)))


TEST = Shaping.of([provider("big", "mx.big.test", "big-mail.test"), provider("small", "small.test")], [])


@pytest.mark.parametrize(
    ("hosts", "expected"),
    [
        (["mx1.mx.big.test"], "big"),
        (["mx.big.test"], "big"),  # the suffix itself
        (["a.mx.big.test", "b.big-mail.test"], "big"),  # two suffixes of one provider
        (["MX1.MX.BIG.TEST."], "big"),  # case and the final dot
        (["mx1.notmx.big.test"], None),  # a suffix matches whole labels only
        (["evilsmall.test"], None),
        (["mx1.mx.big.test", "mx.other.test"], None),  # one host is no provider's
        (["mx1.mx.big.test", "mx.small.test"], None),  # two providers
        ([], None),
    ],
    ids=["host", "suffix-itself", "two-suffixes", "case-and-dot", "label-boundary", "no-partial-label",
         "one-foreign-host", "two-providers", "no-hosts"],
)  # fmt: skip
def test_a_route_belongs_to_a_provider_when_every_preferred_host_does(hosts: list[str], expected: str | None) -> None:
    found = TEST.provider_for(hosts)
    assert (found.name if found else None) == expected


@pytest.mark.parametrize(
    ("hosts", "expected"),
    [
        (["gmail-smtp-in.l.google.com", "alt1.gmail-smtp-in.l.google.com"], "gmail"),
        (["aspmx.l.google.com"], "gmail"),
        (["example-com.mail.protection.outlook.com"], "outlook"),
        (["hotmail-com.olc.protection.outlook.com"], "outlook"),
        (["mta5.am0.yahoodns.net"], "yahoo"),
        (["mx01.mail.icloud.com"], "icloud"),
        (["mfsmax.docomo.ne.jp"], "docomo"),
        (["lsean.ezweb.ne.jp"], "au"),
        (["mx.i.softbank.jp"], "softbank"),
        (["mx.example.net"], None),
    ],
    ids=["gmail", "workspace", "m365", "outlook-com", "yahoo", "icloud", "docomo", "au", "softbank", "none"],
)
def test_the_shipped_providers_match_their_mx_hosts(hosts: list[str], expected: str | None) -> None:
    found = SHIPPED.provider_for(hosts)
    assert (found.name if found else None) == expected


def test_every_shipped_number_says_where_it_comes_from() -> None:
    text = shaping.SHIPPED_SHAPING.read_text()
    assert {p.name for p in SHIPPED.providers} >= {"gmail", "outlook", "yahoo", "icloud", "docomo", "au", "softbank"}
    for p in SHIPPED.providers:
        assert p.source.startswith("https://"), p.name
        lines = text.split(f"[provider.{p.name}]")[1].split("\n[")[0].splitlines()
        for n, line in enumerate(lines):
            if re.match(r"^(connection_limit|messages_per_connection|recipients_per_\w+|rate) =", line):
                above = n - 1  # a number comes under a comment, maybe with other numbers between
                while above > 0 and re.match(r"^\w+ =", lines[above]):
                    above -= 1
                assert lines[above].startswith("#"), f"{p.name}: {line} has no comment above it"
    assert SHIPPED.provider("docomo").limits.recipients_per_connection == 100  # type: ignore[union-attr]
    assert all(r.source.startswith("https://") for r in SHIPPED.rules)


# -- the files ----------------------------------------------------------------------------------------


def test_the_override_replaces_providers_and_rules_of_its_names_and_comes_first(tmp_path: Path) -> None:
    override = tmp_path / "shaping.toml"
    override.write_text(
        '[provider.gmail]\nsuffixes = ["google.com"]\nconnection_limit = 3\n'
        '[provider.test]\nsuffixes = ["mx.provider.test"]\nconnection_limit = 2\n'
        '[[automation]]\nname = "mine"\ntext = "slow down"\naction = "suspend"\nduration = "1m"\n'
        '[[automation]]\nname = "gmail-try-again-later"\nproviders = ["gmail"]\ntext = "x"\naction = "limit"\n'
        'connection_limit = 1\nduration = "2m"\n'
    )
    got = shaping.load_shaping(override)
    assert got.files == (str(override), str(shaping.SHIPPED_SHAPING))
    gmail = got.provider("gmail")
    assert gmail is not None and gmail.limits.connection_limit == 3 and gmail.suffixes == ("google.com",)
    assert got.provider_of("mx1.mx.provider.test") == got.provider("test")
    assert got.provider_of("x.googlemail.com") is None  # the override's gmail names google.com only
    assert [r.name for r in got.rules][:2] == ["mine", "gmail-try-again-later"]
    replaced = got.rules[1]
    assert replaced.duration_s == 120 and replaced.connection_limit == 1
    assert sum(r.name == "gmail-try-again-later" for r in got.rules) == 1


BAD = [
    ("not toml", "[provider.x\n", "not valid TOML"),
    ("unknown top key", "[providers.x]\n", "unknown key 'providers'"),
    ("unknown provider key", '[provider.x]\nsuffixes = ["x.test"]\nconections = 2\n', "provider x: unknown key"),
    ("no suffixes", "[provider.x]\nconnection_limit = 2\n", "provider x: suffixes"),
    ("bad suffix", '[provider.x]\nsuffixes = ["*.x.test"]\n', "provider x: suffixes"),
    ("limit zero", '[provider.x]\nsuffixes = ["x.test"]\nconnection_limit = 0\n', "provider x: connection_limit"),
    ("bad rate", '[provider.x]\nsuffixes = ["x.test"]\nrate = "fast"\n', "provider x: rate"),
    (
        "suffix twice",
        '[provider.x]\nsuffixes = ["x.test"]\n[provider.y]\nsuffixes = ["x.test"]\n',
        "suffix 'x.test' is claimed by both provider x and y",
    ),
    ("rule without name", '[[automation]]\ntext = "x"\naction = "suspend"\nduration = "1m"\n', "automation rule 1: name"),
    ("bad regex", '[[automation]]\nname = "r"\ntext = "(unclosed"\naction = "suspend"\nduration = "1m"\n',
     "automation rule 'r': text: bad regular expression"),
    ("bad action", '[[automation]]\nname = "r"\ntext = "x"\naction = "pause"\nduration = "1m"\n',
     "automation rule 'r': action"),
    ("no duration", '[[automation]]\nname = "r"\ntext = "x"\naction = "suspend"\n', "automation rule 'r': duration"),
    ("hold of days", '[[automation]]\nname = "r"\ntext = "x"\naction = "suspend"\nduration = "2d"\n',
     "automation rule 'r': duration: expected from 1s to 1d"),
    ("count without period", '[[automation]]\nname = "r"\ntext = "x"\naction = "suspend"\ncount = 3\nduration = "1m"\n',
     "automation rule 'r': period"),
    ("limit sets nothing", '[[automation]]\nname = "r"\ntext = "x"\naction = "limit"\nduration = "1m"\n',
     "automation rule 'r': action limit"),
    ("suspend sets a limit", '[[automation]]\nname = "r"\ntext = "x"\naction = "suspend"\nconnection_limit = 1\n'
     'duration = "1m"\n', "automation rule 'r': action suspend"),
    ("code 2xx", '[[automation]]\nname = "r"\ntext = "x"\ncodes = [250]\naction = "suspend"\nduration = "1m"\n',
     "automation rule 'r': codes"),
    ("unknown provider", '[[automation]]\nname = "r"\nproviders = ["nosuch"]\ntext = "x"\naction = "suspend"\n'
     'duration = "1m"\n', "automation rule 'r': no provider 'nosuch'"),
    ("name twice", '[[automation]]\nname = "r"\ntext = "x"\naction = "suspend"\nduration = "1m"\n' * 2,
     "automation rule 'r': a second rule"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "said"), [(t, s) for _, t, s in BAD], ids=[i for i, _, _ in BAD])
def test_a_bad_file_is_refused_naming_the_file_and_the_entry(tmp_path: Path, text: str, said: str) -> None:
    override = tmp_path / "ops-shaping.toml"
    override.write_text(text)
    with pytest.raises(ShapingError) as caught:
        shaping.load_shaping(override)
    assert str(override) in str(caught.value) and said in str(caught.value)


def test_a_missing_override_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ShapingError, match="nope.toml: cannot read"):
        shaping.load_shaping(tmp_path / "nope.toml")


# -- automation ---------------------------------------------------------------------------------------

TRY_AGAIN = "421 4.7.0 Try again later, closing connection"


def rule(name: str = "r", **kw: object) -> Rule:
    base: dict[str, object] = {"text": re.compile("try again later", re.I), "action": "limit", "duration_s": 60.0}
    base |= {"connection_limit": 1} if kw.get("action", "limit") == "limit" else {}
    return Rule(name, **(base | kw))  # type: ignore[arg-type]


CONFIGURED = Limits(connection_limit=10, messages_per_connection=100, rate=(0.0, 0.0))


@pytest.mark.parametrize(
    ("r", "times", "fired_at"),
    [
        (rule(), [0.0], [0.0]),
        (rule(count=3, period_s=10.0), [0.0, 1.0, 2.0], [2.0]),
        (rule(count=3, period_s=10.0), [0.0, 6.0, 11.0, 12.0], [12.0]),  # the hit at 0 is out of the period by 11
        (rule(count=3, period_s=10.0), [0.0, 20.0, 40.0], []),
        (rule(count=2, period_s=10.0), [0.0, 1.0, 2.0, 3.0], [1.0]),  # in force until 61: later hits count nothing
    ],
    ids=["immediate", "three-in-period", "old-hit-dropped", "too-slow", "no-count-while-in-force"],
)
def test_a_rule_fires_on_its_trigger(r: Rule, times: list[float], fired_at: list[float]) -> None:
    auto = Automation([r])
    fired = [t for t in times if auto.observe("provider:big", "big", 7, 421, "4.7.0", TRY_AGAIN, t)]
    assert fired == fired_at


@pytest.mark.parametrize(
    ("r", "provider", "code", "enhanced", "text", "fires"),
    [
        (rule(providers=("big",)), "big", 421, "4.7.0", TRY_AGAIN, True),
        (rule(providers=("big",)), "small", 421, "4.7.0", TRY_AGAIN, False),
        (rule(providers=("big",)), "", 421, "4.7.0", TRY_AGAIN, False),
        (rule(), "", 421, "4.7.0", TRY_AGAIN, True),  # no providers: every site
        (rule(codes=frozenset({451})), "big", 421, "4.7.0", TRY_AGAIN, False),
        (rule(enhanced=("X.7.0",)), "big", 421, "4.7.0", TRY_AGAIN, True),
        (rule(enhanced=("4.7.28",)), "big", 421, "4.7.0", TRY_AGAIN, False),
        (rule(), "big", 421, "4.7.0", "421 4.7.0 closing", False),
    ],
    ids=["its-provider", "other-provider", "no-provider", "every-site", "code", "x-enhanced", "enhanced", "text"],
)
def test_a_rule_matches_its_providers_codes_and_text(
    r: Rule, provider: str, code: int, enhanced: str, text: str, fires: bool
) -> None:
    assert bool(Automation([r]).observe("site", provider, None, code, enhanced, text, 0.0)) is fires


def test_a_limit_holds_for_its_duration_then_the_site_is_as_configured() -> None:
    auto = Automation([rule(connection_limit=2, duration_s=30.0)])
    assert auto.limits("s", CONFIGURED) == CONFIGURED
    (change,) = auto.observe("s", "big", None, 421, "4.7.0", TRY_AGAIN, 100.0)
    assert (change.until, change.reply) == (130.0, "421 4.7.0")
    assert auto.limits("s", CONFIGURED).connection_limit == 2
    assert auto.limits("other", CONFIGURED) == CONFIGURED  # per site
    assert auto.next_end() == 130.0
    assert auto.expire(129.9) == []
    assert auto.expire(130.0) == [change]
    assert auto.limits("s", CONFIGURED) == CONFIGURED and auto.next_end() is None and not auto.active


def test_the_lowest_of_the_changes_in_force_wins_value_by_value() -> None:
    auto = Automation(
        [
            rule("a", connection_limit=3, duration_s=10.0),
            rule("b", connection_limit=5, messages_per_connection=20, rate=(2.0, 1.0), duration_s=20.0),
            rule("c", connection_limit=None, rate=(1.0, 10.0), duration_s=30.0),
        ]
    )
    auto.observe("s", "", None, 421, "4.7.0", TRY_AGAIN, 0.0)
    assert auto.limits("s", CONFIGURED) == Limits(3, 20, 0, 0, (1.0, 10.0))
    auto.expire(10.0)  # a ends: b's 5 is the lowest left
    assert auto.limits("s", CONFIGURED) == Limits(5, 20, 0, 0, (1.0, 10.0))
    auto.expire(20.0)
    assert auto.limits("s", CONFIGURED) == Limits(10, 100, 0, 0, (1.0, 10.0))
    auto.expire(30.0)
    assert auto.limits("s", CONFIGURED) == CONFIGURED


def test_a_limit_rule_never_raises_a_value_above_the_configured_one() -> None:
    configured = Limits(connection_limit=2, messages_per_connection=10, rate=(1.0, 1.0))
    auto = Automation([rule(connection_limit=4, messages_per_connection=50, rate=(100.0, 1.0))])
    auto.observe("s", "", None, 421, "4.7.0", TRY_AGAIN, 0.0)
    assert auto.limits("s", configured) == configured
    unlimited = Limits(connection_limit=2, messages_per_connection=10, rate=(0.0, 0.0))  # no rate: the rule's
    assert auto.limits("s", unlimited).rate == (100.0, 1.0)


def test_a_suspension_holds_the_site_or_one_tenant_and_ends() -> None:
    refused = "550 5.7.1 try again later"
    auto = Automation(
        [
            rule("site", action="suspend", codes=frozenset({421})),
            rule("one", action="suspend_tenant", codes=frozenset({550})),
        ]
    )
    assert auto.observe("s", "", None, 550, "5.7.1", refused, 0.0) == []  # a tenant's hold needs its tenant
    (held_tenant,) = auto.observe("s", "", 7, 550, "5.7.1", refused, 1.0)
    assert (held_tenant.action, held_tenant.tenant_id, held_tenant.until) == ("suspend_tenant", 7, 61.0)
    assert auto.suspension("s", 7, 2.0) is held_tenant
    assert auto.suspension("s", 8, 2.0) is None and auto.suspension("other", 7, 2.0) is None
    (held_site,) = auto.observe("s", "", 8, 421, "4.7.0", TRY_AGAIN, 3.0)
    assert held_site.action == "suspend" and held_site.tenant_id is None
    assert auto.suspension("s", 9, 4.0) is held_site
    assert auto.expire(61.0) == [held_tenant]
    assert auto.expire(63.0) == [held_site]
    assert auto.suspension("s", 7, 63.0) is None and auto.suspension("s", 9, 63.0) is None


def test_each_tenant_has_its_own_count_for_a_tenant_suspension() -> None:
    auto = Automation([rule(action="suspend_tenant", count=2, period_s=60.0)])
    assert auto.observe("s", "", 1, 421, "4.7.0", TRY_AGAIN, 0.0) == []
    assert auto.observe("s", "", 2, 421, "4.7.0", TRY_AGAIN, 1.0) == []  # another tenant's first
    (change,) = auto.observe("s", "", 1, 421, "4.7.0", TRY_AGAIN, 2.0)
    assert change.tenant_id == 1 and auto.suspension("s", 2, 3.0) is None


def test_new_rules_keep_the_changes_in_force_and_drop_counts_of_rules_gone() -> None:
    auto = Automation([rule("a"), rule("b", count=5, period_s=60.0)])
    auto.observe("s", "", None, 421, "4.7.0", TRY_AGAIN, 0.0)
    auto.set_rules([rule("c")])
    assert [c.rule for c in auto.active.values()] == ["a"]
    assert auto.limits("s", CONFIGURED).connection_limit == 1
    assert auto._hits == {}


# -- worker shares ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("index", "workers", "limit", "rate", "rule_limit"),
    [(0, 1, 4, (8.0, 1.0), 3), (0, 2, 2, (4.0, 1.0), 2), (1, 2, 2, (4.0, 1.0), 1), (2, 3, 1, (8 / 3, 1.0), 1)],
    ids=["alone", "first-of-two", "second-of-two", "third-of-three"],
)
def test_a_worker_holds_its_share_of_a_providers_limits(
    index: int, workers: int, limit: int, rate: tuple[float, float], rule_limit: int
) -> None:
    whole = Shaping.of([provider("big", "big.test")], [rule(connection_limit=3)])
    share = share_shaping(whole, index, workers)
    got = share.provider("big")
    assert got is not None and got.limits.connection_limit == limit and got.limits.rate == pytest.approx(rate)
    assert share.rules[0].connection_limit == rule_limit
    assert share.provider_of("mx.big.test") is got


# -- a provider site's ready queue ------------------------------------------------------------------


def _route(hop: str) -> Route:
    return Route("provider:big", ((Host(hop, ("127.0.0.1",), 25),),), hop, "big")


def _job(qid: str, domain: str, n: int = 1, tenant: int = 1) -> Job:
    return Job(qid, tenant, "a@acme.test", domain, 0.0, 10, "<m>", [Due(i, f"r{i}@{domain}", 0) for i in range(n)])


def _site() -> ReadyQueue:
    q = ReadyQueue.new(
        "provider:big", _route("mx-a"), limit=4, initial_concurrency=4, message_rate=(0.0, 0.0),
        connect_rate_per_s=100.0, now=0.0,
    )  # fmt: skip
    q.add_route("a.test", _route("mx-a"))
    q.add_route("b.test", _route("mx-b"))
    q.add_route("c.test", _route("mx-a"))
    return q


def test_a_connection_takes_only_jobs_of_its_next_hop() -> None:
    q = _site()
    for job in (_job("1", "b.test"), _job("2", "a.test"), _job("3", "c.test")):
        q.push(job, join=True, max_recipients=50)
    assert q.route_of(q.queue[0]).next_hop == "mx-b"  # a new connection goes where the head job goes
    assert q.take("mx-a").queue_id == "2"  # type: ignore[union-attr]
    assert q.take("mx-a").queue_id == "3"  # type: ignore[union-attr]
    assert q.take("mx-a") is None  # what is left is for mx-b: the connection makes way
    assert q.take("mx-b").queue_id == "1"  # type: ignore[union-attr]


def test_a_message_joins_its_job_only_at_the_same_next_hop() -> None:
    q = _site()
    assert q.push(_job("1", "a.test"), join=True, max_recipients=50)
    assert not q.push(_job("1", "c.test"), join=True, max_recipients=50)  # same hop: one transaction
    assert q.push(_job("1", "b.test"), join=True, max_recipients=50)  # another hop: a job of its own
    assert [len(j.recipients) for j in q.queue] == [2, 1]


def test_automation_limits_shrink_the_window_and_a_hold_takes_jobs_out() -> None:
    q = _site()
    q.set_limits(Limits(connection_limit=2, messages_per_connection=5, rate=(1.0, 1.0)), now=0.0)
    assert (q.limit, q.window, q.messages_per_connection, q.message_rate) == (2, 2.0, 5, (1.0, 1.0))
    q.set_limits(Limits(connection_limit=4, messages_per_connection=100), now=1.0)
    assert (q.limit, q.window) == (4, 2.0)  # slow start climbs back
    for job in (_job("1", "a.test", tenant=1), _job("2", "b.test", tenant=2), _job("3", "c.test", tenant=1)):
        q.push(job, join=True, max_recipients=50)
    held = q.remove_where(lambda j: j.tenant_id == 1)
    assert [j.queue_id for j in held] == ["1", "3"] and [j.queue_id for j in q.queue] == ["2"]
    assert set(q.open_jobs) == {"2"}


# -- a host of workers ------------------------------------------------------------------------------


def test_the_supervisor_lists_each_workers_shaping_side_by_side_and_keeps_sites_in_the_summary() -> None:
    from cmcd.daemon import merge

    answers = [{"workers": [{"worker": 1, "sites": ["b"]}]}, {"workers": [{"worker": 0, "sites": ["a"]}]}]
    assert merge.side_by_side(answers) == {"workers": [{"worker": 0, "sites": ["a"]}, {"worker": 1, "sites": ["b"]}]}
    one = {"states": {"queued": 1}, "buckets_min": [5], "total": [1, 1], "more_domains": 0,
           "domains": [{"domain": "a.test", "counts": [1, 1], "site": ""}], "sites": []}  # fmt: skip
    two = {"states": {"queued": 2}, "buckets_min": [5], "total": [2, 2], "more_domains": 0,
           "domains": [{"domain": "a.test", "counts": [2, 2], "site": "provider:big"}],
           "sites": [{"site": "provider:big", "worker": 1}]}  # fmt: skip
    out = merge.summary([one, two])
    assert out["domains"] == [{"domain": "a.test", "counts": [3, 3], "site": "provider:big"}]
    assert out["sites"] == [{"site": "provider:big", "worker": 1}]
    assert "sites" not in merge.summary([{k: v for k, v in one.items() if k != "sites"}])
