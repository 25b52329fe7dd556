"""The uptime history in the data directory: it survives the process, and a node advertises it."""

from __future__ import annotations

import stat
import time

import pytest

from p2pdeploy.fabric.contribution import Contribution
from p2pdeploy.fabric.uptime import Session, UptimeHistory
from p2pdeploy.resource.description import NodeDescription
from p2pdeploy.runtime.node import open_node
from p2pdeploy.runtime.store_sqlite import open_database
from p2pdeploy.runtime.uptime_store import UPTIME_DATABASE_FILE, UptimeStore

LOOPBACK = ("127.0.0.1", 0)


def test_a_history_saved_at_each_heartbeat_survives_a_crash_and_counts_the_downtime(tmp_path):
    store = UptimeStore(tmp_path)
    history = store.load()
    assert history.to_dict() == UptimeHistory().to_dict()  # first start: nothing yet
    history.begin(1000.0)
    store.save(history)
    for t in (1060.0, 1120.0, 1180.0):
        history.record_heartbeat(t)
        store.save(history)
    store.close()  # the process dies at 1200 without closing its session

    with UptimeStore(tmp_path) as again:
        restored = again.load()
        assert restored.to_dict() == history.to_dict()
        restored.begin(1480.0)
        again.save(restored)
    assert restored.sessions == (Session(1000.0, 1180.0, 180.0),)
    assert restored.availability(1780.0) == pytest.approx((180.0 + 300.0) / 780.0)
    assert stat.S_IMODE((tmp_path / UPTIME_DATABASE_FILE).stat().st_mode) == 0o600


def test_an_unreadable_history_is_replaced_by_an_empty_one(tmp_path, caplog):
    UptimeStore(tmp_path).close()
    db = open_database(tmp_path / UPTIME_DATABASE_FILE, durable=False)
    db.execute("INSERT INTO history (id, data) VALUES (0, ?)", ('{"version": 1, "sessions": [[5, 1, 0]]}',))
    db.close()
    with UptimeStore(tmp_path) as store:
        assert store.load().to_dict() == UptimeHistory().to_dict()
    assert "ignored the uptime history" in caplog.text


async def test_a_node_begins_a_session_advertises_its_availability_and_closes_the_session_when_it_stops(tmp_path):
    wall = time.time()
    with UptimeStore(tmp_path) as store:  # an earlier run: up one hour, ended one hour ago
        earlier = UptimeHistory()
        earlier.begin(wall - 7200.0)
        earlier.end(wall - 3600.0)
        store.save(earlier)
    async with open_node(LOOPBACK, data_dir=tmp_path, contribution=Contribution(cpu_cores=0.5),
                         hand_off=False) as node:
        assert node.uptime.current_start_s is not None and node.uptime.current_start_s >= wall
        availability = node.core.layer(NodeDescription).attributes()["availability"]
        assert availability == pytest.approx(0.5, abs=0.01)
        node.heartbeat()
        with UptimeStore(tmp_path) as peek:  # saved while running: a crash now would keep this session
            assert peek.load().current_start_s == node.uptime.current_start_s
    with UptimeStore(tmp_path) as store:
        stored = store.load()
    assert stored.current_start_s is None
    assert len(stored.sessions) == 2 and stored.sessions[1].start_s >= wall
