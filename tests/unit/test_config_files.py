"""The shipped configuration files load, and etc/cmcd.toml documents every key with its default."""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path

from cmcd import config

ROOT = Path(__file__).resolve().parents[2]


def _keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "base_dir":
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _keys(tp, f"{prefix}{f.name}.")  # type: ignore[arg-type]
        elif typing.get_origin(tp) is dict:
            continue  # tables of user-chosen names (routes, tenant_limits) are documented by example
        else:
            out.append(prefix + f.name)
    return out


def test_production_file_names_every_key_with_its_default() -> None:
    data = tomllib.loads((ROOT / "etc/cmcd.toml").read_text())
    defaults = config.Config()
    missing, wrong = [], []
    for key in _keys(config.Config):
        section, name = key.split(".")
        if key == "server.workers":  # its default is the machine's CPU count: named in a comment
            assert "# workers = " in (ROOT / "etc/cmcd.toml").read_text()
            continue
        if name not in data.get(section, {}):
            missing.append(key)
            continue
        if section == "smtp":
            continue  # checked as a whole below (it needs a certificate to validate)
        parsed = config.from_dict({section: {name: data[section][name]}, "smtp": {"tls_cert": "c", "tls_key": "k"}})
        if getattr(getattr(parsed, section), name) != getattr(getattr(defaults, section), name):
            wrong.append(key)
    assert missing == [], f"undocumented keys: {missing}"
    assert wrong == [], f"documented value differs from the default: {wrong}"


def test_smtp_defaults_match_the_documented_values() -> None:
    data = tomllib.loads((ROOT / "etc/cmcd.toml").read_text())["smtp"]
    data.update(tls_cert="c.pem", tls_key="k.pem")
    parsed = config.from_dict({"smtp": data}).smtp
    assert dataclasses.replace(parsed, tls_cert="", tls_key="") == config.Config().smtp


def test_dev_file_loads() -> None:
    cfg = config.load(ROOT / "etc/cmcd.dev.toml")
    assert cfg.smtp.listen == ("127.0.0.1:2587",)
    assert cfg.smtp.listen_tls == ("127.0.0.1:2465",)
    assert str(cfg.path(cfg.store.path)).startswith("var")
