"""cluster/curve.py: key sets, the plaintext rule, and CurveZMQ + ZAP between real sockets."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
import zmq

from cluster.curve import ClusterKeys, CurveGuard, check_endpoint, create_keys


def test_key_set_layout_and_no_overwrite(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    written = create_keys(d)
    assert {p.relative_to(d).as_posix() for p in written} == {
        "broker.key", "broker.key_secret", "worker.key", "worker.key_secret",
        "authorized/broker.key", "authorized/worker.key"}
    assert os.stat(d / "worker.key_secret").st_mode & 0o077 == 0  # secrets: owner only
    with pytest.raises(ValueError, match="already exists"):
        create_keys(d)
    create_keys(d, "w7")
    assert (d / "authorized" / "w7.key").exists()
    with pytest.raises(ValueError, match="no key set"):
        create_keys(tmp_path / "empty", "w8")
    broker, worker = ClusterKeys.load(d, "broker"), ClusterKeys.load(d, "worker")
    assert worker.broker_public == broker.public
    assert {broker.public, worker.public} < broker.authorized and len(broker.authorized) == 3
    with pytest.raises(ValueError, match=r"nobody\.key_secret"):
        ClusterKeys.load(d, "nobody")


@pytest.mark.parametrize(("endpoint", "keys", "insecure", "ok"), [
    ("tcp://0.0.0.0:7000", False, False, False),
    ("tcp://10.1.2.3:7000", False, False, False),
    ("tcp://db.internal:7000", False, False, False),
    ("tcp://0.0.0.0:7000", True, False, True),
    ("tcp://0.0.0.0:7000", False, True, True),
    ("tcp://127.0.0.2:7000", False, False, True),
    ("tcp://[::1]:7000", False, False, True),
    ("tcp://localhost:7000", False, False, True),
    ("ipc:///run/zrpc/broker.ipc", False, False, True),
])
def test_plaintext_tcp_needs_loopback_or_consent(endpoint: str, keys: bool, insecure: bool,
                                                 ok: bool) -> None:
    if ok:
        check_endpoint("--router", endpoint, keys, insecure)
    else:
        with pytest.raises(ValueError, match="--cluster-keys"):
            check_endpoint("--router", endpoint, keys, insecure)


def test_only_authorized_keys_get_through(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    create_keys(tmp_path / "ours")
    create_keys(tmp_path / "theirs")
    ours = ClusterKeys.load(tmp_path / "ours", "broker")
    ctx: zmq.Context[Any] = zmq.Context()
    guard = CurveGuard(ctx, ours)
    router = ctx.socket(zmq.ROUTER)
    try:
        guard.serve(router)
        router.bind("tcp://127.0.0.1:0")
        endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        for name, expect in (("ours", True), ("theirs", False)):
            keys = ClusterKeys.load(tmp_path / name, "worker")
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            guard.client(dealer, ours.public)  # the brokers' public key is no secret
            dealer.curve_secretkey, dealer.curve_publickey = keys.secret, keys.public
            with caplog.at_level(logging.WARNING, logger="zrpc.cluster"):
                dealer.connect(endpoint)
                dealer.send(name.encode())
                got = router.poll(3000 if expect else 1000)
            assert bool(got) is expect, name
            if got:
                assert router.recv_multipart()[1] == b"ours"
            dealer.close(0)
        assert guard.refused == 1
        assert any("not in" in r.getMessage() and "authorized" in r.getMessage()
                   for r in caplog.records)
    finally:
        router.close(0)
        guard.close()
        ctx.term()
