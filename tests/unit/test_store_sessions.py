"""API sessions in the store: every change of a user's credentials or standing ends them (one
function, called in the change's own transaction), and they are listed and revoked by a public id."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cmcd.errors import NotFound
from cmcd.store import open_store
from cmcd.store.api_store import digest, session_id
from cmcd.store.store import Store

TOKEN, OTHER = "cms_first-session-token", "cms_second-session-token"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(tmp_path / "cmcd.db", tmp_path / "data.key")
    s.tenant_add("acme")
    s.user_add("acme", "boss", "admin", "x")
    s.user_add("acme", "alice", "sender", "x")
    yield s
    s.close()


def _open(store: Store, token: str, login: str = "boss") -> str:
    u = store.user("acme", login)
    return store.session_add(token, u.id, u.tenant_id, time.time() + 3600)


def _otp(store: Store) -> None:
    u = store.otp_enroll("acme", "boss", b"0" * 20)
    store.otp_use_step(u.id, 1, confirm_with=[])


CHANGES: dict[str, Callable[[Store], object]] = {
    "password": lambda s: s.user_update("acme", "boss", password_hash="y"),
    "disable": lambda s: s.user_update("acme", "boss", enabled=False),
    "enable": lambda s: s.user_update("acme", "boss", enabled=True),
    "role": lambda s: s.user_update("acme", "boss", role="sender"),
    "otp-disable": lambda s: (_otp(s), s.otp_disable("acme", "boss")),
    "otp-enroll": lambda s: s.otp_enroll("acme", "boss", b"1" * 20),
    "delete": lambda s: s.user_delete("acme", "boss"),
    "revoke-all": lambda s: s.session_revoke("acme", "boss", None),
}


@pytest.mark.parametrize("change", list(CHANGES.values()), ids=list(CHANGES))
def test_each_change_ends_the_users_sessions_and_only_theirs(store: Store, change: Callable[[Store], object]) -> None:
    _open(store, TOKEN)
    _open(store, OTHER, "alice")
    assert store.session_caller(TOKEN, time.time()) is not None
    change(store)
    assert store.session_caller(TOKEN, time.time()) is None
    assert store.session_caller(OTHER, time.time()) is not None


def test_a_refused_change_ends_nothing(store: Store) -> None:
    """A change the store refuses (here a user that is not there) rolls back, sessions included;
    a role outside ROLES is refused before the store by the tenancy rule (and by the schema's CHECK)."""
    _open(store, TOKEN)
    with pytest.raises(NotFound):
        store.user_update("acme", "nobody", enabled=False)
    with pytest.raises(sqlite3.IntegrityError):
        store.user_update("acme", "boss", role="root")
    assert store.session_caller(TOKEN, time.time()) is not None


def test_sessions_are_listed_and_revoked_by_a_public_id(store: Store) -> None:
    first, second = _open(store, TOKEN), _open(store, OTHER)
    assert first == session_id(digest(TOKEN)) and len(first) == 16 and first not in TOKEN
    listed = store.sessions("acme", "boss")
    assert [r["id"] for r in listed] == [first, second]
    assert all(r["created"] == r["last_used"] < r["expires"] for r in listed)
    caller = store.session_caller(TOKEN, time.time())
    assert caller is not None and caller.credential == f"session:{first}"
    assert store.session_revoke("acme", "boss", first.upper()) == 1
    assert store.session_caller(TOKEN, time.time()) is None and store.session_caller(OTHER, time.time()) is not None
    with pytest.raises(NotFound, match="has no session"):
        store.session_revoke("acme", "boss", first)
    with pytest.raises(NotFound):
        store.session_revoke("acme", "alice", second)  # another user's session is not found under alice
    assert store.session_end(OTHER) and not store.session_end(OTHER)
    assert store.sessions("acme", "boss") == []


def test_an_api_key_needs_a_role_its_user_may_hold(store: Store) -> None:
    _, admin_key = store.apikey_add("acme", "boss")
    _, sender_key = store.apikey_add("acme", "boss", "sender")
    store.user_update("acme", "boss", role="sender")
    assert store.apikey_caller(admin_key) is None
    caller = store.apikey_caller(sender_key)
    assert caller is not None and caller.role == "sender"
    store.user_update("acme", "boss", role="admin")
    assert store.apikey_caller(admin_key) is not None
