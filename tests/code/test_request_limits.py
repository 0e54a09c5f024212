"""The serving limits in process: JSON bodies read without padding, the request gate's admission
and size checks (ASGI, with a slow app), and the decode memory budget across threads."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time

import pytest

from cars_ml.serving.decode import DecodeBudget, Limits, RequestError, limits_from_env
from cars_ml.serving.gate import CURRENT_WORK, RequestGate, short_message
from cars_ml.serving.request import media_type, parse_body, parse_csv

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
        (b"[" * 50_000 + b"]" * 50_000, "too many JSON items"),
        (b'{"inputs": [' + b"9" * 5000 + b"]}", "number too long"),
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
    """Entries beyond the limit (numpy would pad them to the longest) are refused by their count."""
    body = json.dumps({"inputs": {"image": ["x" * 1000] + [1] * 100}}).encode()
    with pytest.raises(RequestError, match="too many images in one request: 101 > "):
        parse_body(body, LIMITS)


@pytest.mark.parametrize("item", [b"[]", b"{}", b'""', b"0", b"[[]]"])
def test_a_body_of_tiny_items_is_refused_before_it_is_parsed(item, monkeypatch):
    """A million empty lists fit in a few MB and would cost json.loads many times that."""
    body = b'{"inputs": [' + b",".join([item] * 1_000_000) + b"]}"
    assert len(body) < LIMITS.max_request_bytes
    monkeypatch.setattr(json, "loads", lambda *_: pytest.fail("parsed before it was counted"))
    with pytest.raises(RequestError, match="too many JSON items in one request") as caught:
        parse_body(body, LIMITS)
    assert "max_images_per_request=64" in str(caught.value)


def test_every_legitimate_shape_at_the_image_limit_passes_the_count():
    values = ["data:image/png;base64,QUJD"] * LIMITS.max_images_per_request
    for body in (
        {"dataframe_split": {"columns": ["image"], "data": [[v] for v in values]}},
        {"dataframe_records": [{"image": v} for v in values], "params": {}},
        {"instances": [{"image": v} for v in values]},
    ):
        assert parse_body(json.dumps(body).encode(), LIMITS) == values


def test_json_nested_deeper_than_python_allows_is_a_request_error():
    roomy = Limits(max_images_per_request=2000)  # enough items for the nesting to be parsed
    with pytest.raises(RequestError, match="nested too deeply"):
        parse_body(b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", roomy)


@pytest.mark.parametrize(
    ("header", "kind", "charset"),
    [
        ("application/json", "application/json", []),
        ("Application/JSON; Charset=UTF-8", "application/json", ["utf-8"]),
        ('application/json;charset="utf-8"; format=pandas-split', "application/json", ["utf-8"]),
        (
            "application/json; charset=utf-8; charset=latin-1",
            "application/json",
            ["utf-8", "latin-1"],
        ),
        (" text/csv ;  header=present", "text/csv", []),
        ("application/json;", "application/json", []),
    ],
)
def test_media_type_is_parsed_whatever_the_header_looks_like(header, kind, charset):
    parsed, params = media_type(header)
    assert parsed == kind
    assert params.get("charset", []) == charset


def test_csv_bodies_are_read_with_the_same_limits():
    assert parse_csv(b'image\r\nQUJD\r\n\r\n"data:image/png;base64,QUJD"\n', LIMITS) == [
        "QUJD",
        "data:image/png;base64,QUJD",
    ]
    big = "Q" * 1_000_000  # over the csv module's own field limit, within the image limit
    assert parse_csv(f"image\n{big}\n".encode(), LIMITS) == [big]
    for body, message in [
        (b"image\n" + b"QUJD\n" * 100_000, "too many images in one request: 100000 > "),
        (b"image\r" + b"QUJD\r" * 100, "too many images in one request"),
        (b"", "empty request"),
        (b"img\nQUJD\n", "missing column 'image'"),
        (b"image,x\nQUJD,1\n", "unexpected column"),
        (b"image\nQUJD,1\n", "image 0: expected one value in the row, got 2"),
        (b"image\n\xff\n", "not UTF-8"),
        (b"image\n", "empty request: no images"),
    ]:
        with pytest.raises(RequestError, match=message):
            parse_csv(body, LIMITS)


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


def _trickle(pieces: int, every_s: float):
    """An ASGI request whose body arrives a byte every ``every_s`` seconds."""
    scope, _, send, sent = _http([b"{}"], pieces)
    left = [pieces]

    async def receive():
        await asyncio.sleep(every_s)
        left[0] -= 1
        return {"type": "http.request", "body": b"x", "more_body": left[0] > 0}

    return scope, receive, send, sent


def test_slow_bodies_hold_no_slot_and_get_408_at_their_deadline():
    limits = Limits(max_concurrent_requests=1, body_timeout_s=1.0, body_idle_timeout_s=0.3)
    gate = RequestGate(limits)

    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def run():
        slow = [_trickle(1000, 0.1) for _ in range(20)]  # within the idle deadline, too slow
        idle = [_trickle(2, 0.6) for _ in range(5)]  # a pause longer than the idle deadline
        tasks = [asyncio.create_task(gate(*r[:3], app)) for r in slow + idle]
        await asyncio.sleep(0.2)
        loop = asyncio.get_running_loop()
        answered = []
        for _ in range(5):  # normal clients, one slot, while 25 bodies trickle
            start = loop.time()
            scope, receive, send, sent = _http([b"{}"], 2)
            await gate(scope, receive, send, app)
            answered.append((_status(sent), loop.time() - start))
        await asyncio.gather(*tasks)
        return answered, [_status(r[3]) for r in slow], [r[3][-1]["body"] for r in idle]

    answered, slow, idle = asyncio.run(run())
    assert all(status == 200 and seconds < 0.2 for status, seconds in answered), answered
    assert slow == [408] * 20
    assert all(b"body_idle_timeout_s=0.3" in body for body in idle), idle[0]
    assert gate.buffered == 0


def test_bodies_held_at_once_are_bounded():
    gate = RequestGate(Limits(max_request_bytes=2**20, max_buffered_mb=2))
    release = None

    async def app(scope, receive, send):
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def one():
        scope, receive, send, sent = _http([b"x" * 600_000], 600_000)
        await gate(scope, receive, send, app)
        return _status(sent)

    async def run():
        nonlocal release
        release = asyncio.Event()
        held = [asyncio.create_task(one()) for _ in range(3)]
        await asyncio.sleep(0.05)
        refused = await one()  # 4 x 600 kB > 2 MiB: refused while the others are held
        release.set()
        return refused, await asyncio.gather(*held), await one()

    refused, held, later = asyncio.run(run())
    assert refused == 503 and held == [200] * 3 and later == 200
    assert gate.buffered == 0


def test_a_slot_stays_taken_until_the_scoring_thread_ends():
    """MLflow answers 504 after its timeout while the thread scores on: the slot waits for it."""
    gate = RequestGate(Limits(max_concurrent_requests=1, queue_timeout_s=0.2))
    threads = {"now": 0, "most": 0, "skipped": 0}
    lock = threading.Lock()

    def score():
        work = CURRENT_WORK.get()
        if not work.begin():
            threads["skipped"] += 1
            return
        try:
            with lock:
                threads["now"] += 1
                threads["most"] = max(threads["most"], threads["now"])
            time.sleep(0.5)
            with lock:
                threads["now"] -= 1
        finally:
            work.end()

    async def app(scope, receive, send):  # MLflow's app: the thread outlives a 0.1 s timeout
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.to_thread(score), timeout=0.1)
        await send({"type": "http.response.start", "status": 504, "headers": []})

    async def one():
        scope, receive, send, sent = _http([b"{}"], 2)
        await gate(scope, receive, send, app)
        return _status(sent)

    async def run():
        return await asyncio.wait_for(asyncio.gather(one(), one(), one()), 10)

    statuses = asyncio.run(run())
    # The first holds the slot 0.5 s; the others give up queueing at 0.2 s.
    assert sorted(statuses) == [503, 503, 504]
    assert threads["most"] == 1


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


def test_an_operator_overrides_limits_through_the_environment():
    env = {
        "CARS_ML_LIMIT_MAX_CONCURRENT_REQUESTS": "8",
        "CARS_ML_LIMIT_BODY_TIMEOUT_S": " 12.5 ",
        "PATH": "/bin",
    }
    limits = limits_from_env(LIMITS, env)
    assert (limits.max_concurrent_requests, limits.body_timeout_s) == (8, 12.5)
    assert limits.max_request_bytes == LIMITS.max_request_bytes
    assert limits_from_env(LIMITS, {}) is LIMITS
    for env, message in [
        ({"CARS_ML_LIMIT_MAX_CONCURENT_REQUESTS": "8"}, "is not a serving limit"),
        ({"CARS_ML_LIMIT_MAX_PIXELS": "lots"}, "is not an integer"),
        ({"CARS_ML_LIMIT_QUEUE_TIMEOUT_S": "soon"}, "is not a number"),
        ({"CARS_ML_LIMIT_MAX_PIXELS": "0"}, "max_pixels must be > 0"),
        ({"CARS_ML_LIMIT_MAX_BUFFERED_MB": "1"}, "must hold one body"),
    ]:
        with pytest.raises(ValueError, match=message):
            limits_from_env(LIMITS, env)
