"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest

from interceptor.model.servicemap import ServiceMap
from interceptor.resolve.resolver import Resolver
from interceptor.settings import Endpoint, Settings, ZoneSettings
from interceptor.sources.yamlfile import load_file
from tests.helpers import DATA
from tests.unit.fakes import FakeForwarder


@pytest.fixture(scope="module")
def resolver() -> Resolver:
    m = ServiceMap(ZoneSettings())
    m.replace(load_file(DATA / "cluster.yaml").objects)
    s = Settings()
    return Resolver(m, FakeForwarder({}), s, [Endpoint("127.0.0.1", 9)])
