"""[smtp] write_timeout and [api] write_timeout: defaults, units, and values refused by path."""

from __future__ import annotations

import pytest

from cmcd import config
from cmcd.errors import ConfigError

TLS = {"tls_cert": "c.pem", "tls_key": "k.pem"}


def test_defaults_are_thirty_seconds() -> None:
    cfg = config.Config()
    assert cfg.smtp.write_timeout == 30.0 and cfg.api.write_timeout == 30.0


@pytest.mark.parametrize(
    ("section", "value", "seconds"),
    [("smtp", "2s", 2.0), ("smtp", "1m", 60.0), ("api", 5, 5.0), ("api", "1h", 3600.0)],
    ids=["smtp-seconds", "smtp-minutes", "api-number", "api-hour"],
)
def test_accepted(section: str, value: object, seconds: float) -> None:
    data: dict[str, dict[str, object]] = {"smtp": dict(TLS)}
    data.setdefault(section, {})["write_timeout"] = value
    cfg = config.from_dict(data)
    got = getattr(cfg, section).write_timeout
    assert got == seconds and isinstance(got, config.Duration)


@pytest.mark.parametrize(
    ("section", "value"),
    [("smtp", 0), ("smtp", "0.5s"), ("smtp", float("inf")), ("api", "2h"), ("api", float("nan")), ("api", "soon")],
    ids=["smtp-zero", "smtp-under-1s", "smtp-inf", "api-over-1h", "api-nan", "api-not-a-duration"],
)
def test_refused_with_its_path(section: str, value: object) -> None:
    data: dict[str, dict[str, object]] = {"smtp": dict(TLS)}
    data.setdefault(section, {})["write_timeout"] = value
    with pytest.raises(ConfigError) as err:
        config.from_dict(data)
    assert any(p.startswith(f"{section}.write_timeout:") for p in err.value.problems), err.value.problems
