"""kill -9 during active delivery, again and again: every accepted recipient ends in exactly one final state.

Delivery is at-least-once: a message handed to the sink just before the kill, whose outcome was
not yet committed, is sent again after the restart. The mail log still has exactly one final
event per recipient (the outcome and its event commit together), and the duplicates the sink saw
are counted and printed, not hidden.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from typing import Any

from tests.e2e.test_delivery import FAST, queue_rows, submit
from tests.peers import Sink, free_port

MESSAGES = 60
KILLS = 4


def test_kill_9_during_delivery_loses_nothing(make_cmcd: Any) -> None:
    rng = random.Random(7)
    with Sink("127.0.0.2", free_port("127.0.0.2"), data_delay=0.03) as sink:
        delivery = FAST | {"routes": {"*": sink.address}, "connection_limit": 4, "initial_concurrency": 4}
        # queue everything first with delivery off, so every kill lands while delivery is busy
        d = make_cmcd({"delivery": delivery | {"enabled": False}})
        accepted: dict[str, list[str]] = {}
        for n in range(MESSAGES):
            rcpts = [f"m{n}-r{i}@dst{i}.test" for i in range(rng.randint(1, 3))]
            accepted[submit(d, rcpts)] = rcpts
        d.stop()
        d.config["delivery"]["enabled"] = True
        d.write_config()
        for _ in range(KILLS):
            before = len(sink.messages)
            d.start()
            deadline = time.monotonic() + 20
            while len(sink.messages) < before + rng.randint(2, 8) and time.monotonic() < deadline:
                time.sleep(0.01)
            d.kill9()
        d.start()
        wanted = {(q, r) for q, rcpts in accepted.items() for r in rcpts}
        rows = d.wait_mail_log(lambda rows: sum(r["event"] == "delivered" for r in rows) >= len(wanted), timeout=60)
        finals = Counter((r["queue_id"], r["rcpt"]) for r in rows if r["event"] in ("delivered", "bounced", "expired"))
        assert set(finals) == wanted
        assert all(n == 1 for n in finals.values()), [k for k, n in finals.items() if n > 1]
        arrived = Counter(r for m in sink.messages for r in m.rcpt_tos)
        assert set(arrived) == {r for _, r in wanted}  # every recipient got it, at least once
        duplicates = sum(n - 1 for n in arrived.values())
        print(f"\nkill -9 x{KILLS} during delivery: {len(wanted)} recipients, {duplicates} delivered twice")
        # the log spans every start: at least one restart found recipients cut off mid-delivery
        assert any(re.search(r"event=spool_recovered inflight_requeued=[1-9]", line) for line in d.log)
        deadline = time.monotonic() + 10
        while queue_rows(d) != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert queue_rows(d) == (0, 0)
