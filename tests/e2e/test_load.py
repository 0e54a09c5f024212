"""The served champion under bounded load on loopback: concurrent clients, good and bad requests.

Zero 5xx, every good request answered with the reference label, bad ones a 4xx, resident memory
of the server's process tree reported at start and end. The default suite runs a short variant;
the 60 s one is ``slow`` (``make test-slow`` or ``pytest -m slow tests/e2e/test_load.py``).
"""

from __future__ import annotations

import collections
import json
import threading
import time
from dataclasses import dataclass, field

import pytest
from served_model import (
    Served,
    b64,
    colour_png,
    images_request,
    label_of,
    post,
    served_champion,
    solid_png,
    tree_rss_mb,
)

pytestmark = pytest.mark.e2e

CLIENTS = 8
REQUEST_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Served:
    with served_champion(tmp_path_factory.mktemp("load")) as server:
        yield server


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    statuses: collections.Counter = field(default_factory=collections.Counter)
    good: int = 0
    bad: int = 0
    wrong_answers: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)  # bad request not answered 4xx, or errors
    latencies_s: list = field(default_factory=list)


def _requests(served: Served) -> tuple[list, list]:
    """Good requests with their reference labels (asked once before the load) and bad ones."""
    good_values = [colour_png(i, seed=7) for i in range(12)]
    good = []
    for start in range(0, 12, 4):
        for body in (
            images_request([good_values[start][0]]),
            images_request([v for v, _ in good_values[start : start + 4]]),
        ):
            reply = post(served.port, body)
            assert reply.status == 200, reply.text[:300]
            good.append((json.dumps(body).encode(), label_of(reply)))
    tiny = solid_png((10, 200, 10), 4)
    bad = [
        json.dumps(b).encode()
        for b in (
            images_request(["%%% not base64 %%%"]),
            images_request([b64(b"%PDF-1.7 not an image")]),
            images_request([tiny] * 65),
            {"dataframe_split": {"columns": ["img"], "data": [[tiny]]}},
            {"inputs": 5},
        )
    ] + [b"", b"[1, 2]", b"{not json"]
    return good, bad


def _client(served: Served, good, bad, deadline: float, tally: Tally, index: int) -> None:
    turn = index
    while time.monotonic() < deadline:
        turn += 1
        is_good = turn % 3 != 0  # two good requests for every bad one
        body, expected = good[turn % len(good)] if is_good else (bad[turn % len(bad)], None)
        started = time.perf_counter()
        try:
            reply = post(served.port, body, timeout=REQUEST_TIMEOUT_S)
        except OSError as exc:
            with tally.lock:
                tally.statuses["connection error"] += 1
                tally.unexpected.append(f"{type(exc).__name__}: {exc}")
            continue
        elapsed = time.perf_counter() - started
        with tally.lock:
            tally.statuses[reply.status] += 1
            tally.latencies_s.append(elapsed)
            if is_good:
                tally.good += 1
                if reply.status != 200 or label_of(reply) != expected:
                    tally.wrong_answers.append((reply.status, reply.text[:200]))
            else:
                tally.bad += 1
                if not 400 <= reply.status < 500:
                    tally.unexpected.append((reply.status, reply.text[:200]))


def run_load(served: Served, seconds: float) -> dict:
    """Drive ``CLIENTS`` threads for ``seconds``; return counts and memory figures."""
    good, bad = _requests(served)
    rss_start = tree_rss_mb(served.pid)
    tally = Tally()
    deadline = time.monotonic() + seconds
    threads = [
        threading.Thread(target=_client, args=(served, good, bad, deadline, tally, i))
        for i in range(CLIENTS)
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 2 * REQUEST_TIMEOUT_S)
    wall = time.monotonic() - started
    assert not any(t.is_alive() for t in threads), "a client hung past its request timeout"
    rss_end = tree_rss_mb(served.pid)
    latencies = sorted(tally.latencies_s) or [float("nan")]
    summary = {
        "clients": CLIENTS,
        "seconds": round(wall, 1),
        "requests": sum(tally.statuses.values()),
        "good": tally.good,
        "bad": tally.bad,
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items(), key=str)},
        "http_5xx": sum(v for k, v in tally.statuses.items() if isinstance(k, int) and k >= 500),
        "wrong_answers": len(tally.wrong_answers),
        "unexpected": len(tally.unexpected),
        "latency_p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
        "latency_p95_ms": round(1000 * latencies[int(len(latencies) * 0.95)], 1),
        "rss_start_mb": round(rss_start, 1),
        "rss_end_mb": round(rss_end, 1),
    }
    print(f"\n[load] {json.dumps(summary)}", flush=True)
    assert summary["http_5xx"] == 0, summary
    assert not tally.unexpected, tally.unexpected[:5]
    assert not tally.wrong_answers, tally.wrong_answers[:5]
    assert tally.good > 0 and tally.bad > 0, summary
    assert served.alive(), "the server died under load"
    return summary


def test_short_load_no_5xx_and_right_answers(served):
    summary = run_load(served, seconds=8)
    assert summary["rss_end_mb"] > 0


@pytest.mark.slow
def test_sixty_seconds_of_load_memory_stable(served):
    summary = run_load(served, seconds=60)
    growth = summary["rss_end_mb"] - summary["rss_start_mb"]
    # Loose on purpose: allocator caches grow a little; a leak of every request would not.
    assert growth < 300 or summary["rss_end_mb"] < 1.5 * summary["rss_start_mb"], summary
