"""IP credentials: too-wide networks and overlaps with another tenant are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmcd.errors import StoreError
from cmcd.store import open_store
from cmcd.store.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = open_store(tmp_path / "cmcd.db", tmp_path / "data.key")
    for tenant, login in (("acme", "alice"), ("beta", "bob")):
        s.tenant_add(tenant)
        s.user_add(tenant, login, "sender", "x")
    yield s
    s.close()


@pytest.mark.parametrize(
    "cidr", ["0.0.0.0/0", "10.0.0.0/8", "::/0", "2001:db8::/32"], ids=["v4-any", "v4-8", "v6-any", "v6-32"]
)
def test_too_wide_networks_are_refused(store: Store, cidr: str) -> None:
    with pytest.raises(StoreError, match="too wide"):
        store.ipcred_add("acme", "alice", cidr)
    assert store.ipcreds() == []


def test_overlap_with_another_tenant_is_refused_but_not_within_one(store: Store) -> None:
    store.ipcred_add("acme", "alice", "192.0.2.0/24")
    store.ipcred_add("acme", "alice", "192.0.2.10/32")  # same tenant: allowed
    with pytest.raises(StoreError, match="overlaps 192.0.2.0/24"):
        store.ipcred_add("beta", "bob", "192.0.2.128/25")
    store.ipcred_add("beta", "bob", "198.51.100.0/24")
    assert [c.cidr for c in store.ipcreds()] == ["192.0.2.0/24", "192.0.2.10/32", "198.51.100.0/24"]
