"""The serving limits in process: JSON bodies read without padding, the request gate's admission
and size checks (ASGI, with a slow app), and the decode memory budget across threads."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from cars_ml.serving.decode import DecodeBudget, Limits, RequestError
from cars_ml.serving.request import parse_body
from cars_ml.serving.scoring_guard import RequestGate, short_message

LIMITS = Limits()


@pytest.mark.parametrize(
    "body",
    [
        {"dataframe_split": {"columns": ["image"], "data": [["a"], ["b"]]}},
        {"dataframe_split": {"data": [["a"], ["b"]]}},
        {"dataframe_records": [{"image": "a"}, {"image": "b"}]},
        {"inputs": {"image": ["a", "b"]}},
        {"inputs": ["a", "b"]},
        {"instances": [{"image": "a"}, {"image": "b"}]},
        {"instances": ["a", "b"], "params": {}},
    ],
)
def test_every_json_shape_gives_the_same_plain_strings(body):
    values = parse_body(json.dumps(body).encode(), LIMITS)
    assert values == ["a", "b"]
    assert all(type(v) is str for v in values)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "not valid JSON"),
        (b'{"inputs": "\xff"}', "not valid JSON at byte"),
        (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
        (b"[1]", "Received a list"),
        (b"3", "got int"),
        (b'{"image": ["a"]}', "exactly one of the input fields"),
        (b'{"inputs": ["a"], "instances": ["a"]}', "exactly one of the input fields"),
        (b'{"inputs": {"img": ["a"]}}', "missing column 'image'"),
        (b'{"dataframe_split": {"columns": ["image", "x"], "data": []}}', "unexpected column"),
        (b'{"inputs": {"image": []}}', "empty request"),
        (b'{"inputs": [1]}', "image 0: expected a base64-encoded image string, got int"),
    ],
)
def test_bad_bodies_get_a_short_reason(body, message):
    with pytest.raises(RequestError, match=message) as caught:
        parse_body(body, LIMITS)
    assert len(str(caught.value)) < 600


def test_count_is_checked_before_any_value_is_looked_at():
    """A million entries (numpy would pad them to the longest) are refused by their count."""
    body = json.dumps({"inputs": {"image": ["x" * 1000] + [1] * 1_000_000}}).encode()
    with pytest.raises(RequestError, match="too many images in one request: 1000001 > "):
        parse_body(body, LIMITS)


def test_short_message_drops_mlflows_echo_and_caps_the_length():
    echoed = "Failed to predict data '" + "A" * 10_000 + "'. \nError: image 0: invalid base64"
    assert short_message(echoed) == "image 0: invalid base64"
    assert len(short_message("x" * 50_000)) < 1100


def _http(body_chunks: list[bytes], length: int | None):
    headers = [(b"content-type", b"application/json")]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    scope = {"type": "http", "path": "/invocations", "method": "POST", "headers": headers}
    messages = [
        {"type": "http.request", "body": chunk, "more_body": i < len(body_chunks) - 1}
        for i, chunk in enumerate(body_chunks)
    ]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    sent = []

    async def send(message):
        sent.append(message)

    return scope, receive, send, sent


def _status(sent) -> int:
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


def test_gate_refuses_oversized_bodies_and_replays_good_ones():
    gate = RequestGate(Limits(max_request_bytes=100))
    seen = []

    async def app(scope, receive, send):
        seen.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def run():
        scope, receive, send, sent = _http([b"x" * 60, b"y" * 30], 90)
        await gate(scope, receive, send, app)
        assert _status(sent) == 200
        for chunks, length in (([b"x" * 500], 500), ([b"x" * 60, b"y" * 60], None)):
            scope, receive, send, sent = _http(chunks, length)
            await gate(scope, receive, send, app)
            assert _status(sent) == 413
            assert b"max_request_bytes" in sent[-1]["body"]

    asyncio.run(run())
    assert seen == [b"x" * 60 + b"y" * 30]


def test_gate_admits_at_most_the_limit_at_once_and_503s_after_the_queue_timeout():
    gate = RequestGate(Limits(max_concurrent_requests=2, queue_timeout_s=0.3))
    running = {"now": 0, "most": 0}

    async def slow_app(scope, receive, send):
        running["now"] += 1
        running["most"] = max(running["most"], running["now"])
        await asyncio.sleep(0.1 if scope.get("fast") else 1.0)
        running["now"] -= 1
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def one(fast: bool):
        scope, receive, send, sent = _http([b"{}"], 2)
        scope["fast"] = fast
        await gate(scope, receive, send, slow_app)
        return _status(sent)

    async def run():
        slow = [asyncio.create_task(one(False)) for _ in range(2)]
        await asyncio.sleep(0.05)
        waiting = await one(True)  # both slots are taken for 1 s; the queue gives up at 0.3 s
        return waiting, await asyncio.gather(*slow), await one(True)

    waiting, slow, later = asyncio.run(run())
    assert waiting == 503
    assert slow == [200, 200] and later == 200
    assert running["most"] == 2


def test_decode_budget_never_holds_more_than_its_capacity_except_one_alone():
    budget = DecodeBudget(megabytes=10)
    state = {"in_use": 0, "most": 0, "alone_ok": True}
    lock = threading.Lock()

    def decode(nbytes: int) -> None:
        with budget.reserve(nbytes):
            with lock:
                state["in_use"] += nbytes
                state["most"] = max(state["most"], state["in_use"])
                if nbytes > budget.capacity and state["in_use"] != nbytes:
                    state["alone_ok"] = False
            time.sleep(0.05)
            with lock:
                state["in_use"] -= nbytes

    sizes = [4 * 2**20] * 6 + [25 * 2**20] + [3 * 2**20] * 4
    threads = [threading.Thread(target=decode, args=(n,)) for n in sizes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert state["alone_ok"], "a decode over the budget ran beside another"
    assert state["most"] == 25 * 2**20 or state["most"] <= budget.capacity
    assert budget.in_use == 0
