"""A lock that serialises promotions of one registered model across processes and hosts.

Two ``promote`` runs at the same time must leave one champion and one consistent
``champion_history``: each takes this lock, re-reads the registry, decides and applies, then
lets go.

The lock lives in the registry itself: a registered model named ``<model>--promote-lock``. So
every client of one store sees the same lock, whether it reaches the store by its database URL
(``sqlite://``, ``postgresql://``) or through a tracking server (``http(s)://``). Creating a
registered model is atomic (the name is the primary key in the store's database), so exactly
one creator wins; the holder deletes it on release.

The holder holds a *lease*: the tag ``expires_at`` (wall-clock seconds), renewed every
``ttl_s / 4`` by a heartbeat thread, so a move that takes longer than ``ttl_s`` keeps its lock.
A waiter takes over a lock whose lease has expired (its holder died, or lost the store for a
whole ``ttl_s``), and at once a lock whose holder was a process on this machine that no longer
exists (the ``machine`` tag names the boot and PID namespace, so a process in another container
is never mistaken for a dead one). A renewal that finds another owner, or that fails for a whole
``ttl_s``, marks the lock lost: ``check()`` (no registry read) and ``verify()`` (re-reads the
owner, and is called before every registry write of a move) then raise ``LockLostError``.

Only a party that may edit the promoted model can hold its lock. Any authenticated user may create
a registered model, so a read-only one could create the lock model first and, being its owner,
keep everyone else from removing it. A holder therefore confirms itself on the promoted model
(tag ``promote_lock_holder``, which needs edit permission there) right after creating the lock
model; a lock model whose owner is not confirmed after ``grace_s`` is not a promoter's and is
removed, or, when it cannot be, the lock moves to a fresh random name published in the promoted
model's tag ``promote_lock_name`` (which needs edit permission too). ``verify()`` checks both.

Limits: the lock model is briefly visible in the registry UI; hosts' clocks must agree to well
within ``ttl_s``; two waiters that take over the same expired lock at the same instant can race,
and ``verify()`` before each write makes the loser abort rather than write. A lock whose
expired holder cannot be deleted (no permission, server errors) is retried with a pause until
the timeout, which then names the cause.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_SUFFIX = "--promote-lock"
# On the promoted model, written only by parties that may edit it: who holds its lock, and the
# name of the lock model when a squatted one made it move.
HOLDER_TAG = "promote_lock_holder"
NAME_TAG = "promote_lock_name"
# How long a new lock model may stay unconfirmed: its creator writes the confirmation at once.
DEFAULT_GRACE_S = 10.0
TTL_ENV = "CARS_ML_PROMOTE_LOCK_TTL_S"
DEFAULT_TTL_S = 60.0
_POLL_S = 0.1
# Waiting polls back off to this pause, so that a lock that stays busy (or cannot be taken
# over) costs the store a few requests a second at most.
_MAX_POLL_S = 1.0


class LockLostError(RuntimeError):
    """The promotion lock is no longer held: another process may be promoting."""


def lease_ttl_s(ttl_s: float | None = None) -> float:
    """``ttl_s``, else ``CARS_ML_PROMOTE_LOCK_TTL_S``, else 60 s; ValueError unless > 0."""
    raw = os.environ.get(TTL_ENV, "") if ttl_s is None else ttl_s
    if raw == "":
        return DEFAULT_TTL_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"the promotion lock lease must be a number of seconds > 0, got {raw!r}")
    return value


def _machine() -> str:
    """This boot of this machine and its PID namespace: where a PID means one process."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""  # Not Linux: a holder's PID cannot be checked, only its lease.
    return f"{boot}:{namespace}"


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _holder_is_dead(owner: str, machine: str) -> bool:
    """True only when ``owner`` was a process in this PID namespace that no longer exists."""
    if not machine or machine != _machine():
        return False
    try:
        pid = int(owner.split(":")[-2])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # It exists, under another user.
    return False


def _timeout(model_name: str, timeout_s: float, cause: str = "") -> TimeoutError:
    detail = (
        f"; {cause}"
        if cause
        else ". Wait for it to finish and retry; if no promote is running, see README "
        "'Promotion' (locking) for clearing a stale lock"
    )
    return TimeoutError(
        f"Another promote of {model_name!r} held the promotion lock for over {timeout_s:.0f} s"
        f"{detail}."
    )


class _Held:
    """What ``promotion_lock`` yields: the owner and ways to check the lock is still ours."""

    def __init__(self, owner: str, lock_name: str, client, model_name: str) -> None:
        self.method = "registry"
        self.owner = owner
        self.lock_name = lock_name
        self.model_name = model_name
        self._client = client
        self.lost: str | None = None  # Why the heartbeat thinks the lock is gone, if it does.
        self.renewals = 0

    def check(self) -> None:
        """Raise ``LockLostError`` if the heartbeat found the lock gone (no registry read)."""
        if self.lost:
            raise LockLostError(f"promotion lock {self.lock_name!r} lost: {self.lost}")

    def verify(self) -> None:
        """Raise ``LockLostError`` unless the store still names this process the owner, on the
        lock model and on the promoted model."""
        self.check()
        holder = _lock_state(self._client, self.lock_name)[0]
        if holder != self.owner:
            raise LockLostError(f"promotion lock {self.lock_name!r} is now held by {holder}")
        exists, name, confirmed = _published(self._client, self.model_name)
        if exists and (name, confirmed) != (self.lock_name, self.owner):
            raise LockLostError(
                f"promotion lock of {self.model_name!r} is now {name!r} held by {confirmed}"
            )


def _lock_state(client, lock_name: str) -> tuple[str | None, float, str, float]:
    """(owner, expires_at, machine, created_at) of the lock model, or (None, 0, "", 0) when
    there is none; times in wall-clock seconds."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(lock_name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None, 0.0, "", 0.0
        raise
    tags = model.tags
    expires = float(tags.get("expires_at", "0") or 0)
    created = (model.creation_timestamp or 0) / 1000.0
    return tags.get("owner"), expires, tags.get("machine", ""), created


def _published(client, model_name: str) -> tuple[bool, str, str | None]:
    """(whether the promoted model exists, its lock's name, the holder it confirms)."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(model_name).tags
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False, model_name + LOCK_SUFFIX, None
        raise
    return True, tags.get(NAME_TAG) or model_name + LOCK_SUFFIX, tags.get(HOLDER_TAG)


def _heartbeat(held: _Held, client, ttl_s: float, stop: threading.Event, written_at: float) -> None:
    """Renew the lease every ``ttl_s / 4`` until ``stop``; mark the lock lost when it is.

    ``written_at`` (monotonic) is when the lease was last written: the first renewal comes
    ``ttl_s / 4`` after it.
    """
    last_renewed = written_at
    wait = max(0.0, ttl_s / 4 - (time.monotonic() - written_at))
    while not stop.wait(wait):
        wait = ttl_s / 4
        try:
            holder = _lock_state(client, held.lock_name)[0]
            if holder != held.owner:
                held.lost = f"now held by {holder}"
                return
            expires = f"{time.time() + ttl_s:.3f}"
            client.set_registered_model_tag(held.lock_name, "expires_at", expires)
            last_renewed = time.monotonic()
            held.renewals += 1
        except Exception as exc:  # Any failure to renew is retried, then judged by its age.
            if time.monotonic() - last_renewed > ttl_s:
                held.lost = f"lease not renewed for {ttl_s:.0f} s ({type(exc).__name__}: {exc})"
                return
            log.warning("could not renew the promotion lock lease (will retry): %s", exc)


def _acquire(
    client, model_name: str, owner: str, timeout_s: float, ttl_s: float, grace_s: float
) -> tuple[str, float]:
    """Create the lock model (taking over a stale one, moving away from a squatted one);
    its name and the monotonic time its lease began."""
    deadline = time.monotonic() + timeout_s
    pause = _POLL_S
    cause = ""
    while True:
        exists, lock_name, confirmed = _published(client, model_name)
        written_at = time.monotonic()
        if _create(client, lock_name, model_name, owner, ttl_s):
            if not exists:
                return lock_name, written_at
            client.set_registered_model_tag(model_name, HOLDER_TAG, owner)
            if _published(client, model_name)[1] == lock_name:
                return lock_name, written_at
            client.delete_registered_model(lock_name)  # the lock moved meanwhile: follow it
            continue
        holder, expires_at, machine, created = _lock_state(client, lock_name)
        squatted = (
            exists
            and holder is not None
            and holder != confirmed
            and time.time() - created > grace_s
        )
        stale = holder is not None and (
            squatted or expires_at < time.time() or _holder_is_dead(holder, machine)
        )
        # Re-read right before deleting so that a lock freshly re-taken by another waiter is
        # not deleted.
        if stale and _lock_state(client, lock_name)[0] == holder:
            cause = _remove(client, model_name, lock_name, holder, squatted)
            if cause is None:
                continue  # Free now (or moved): take it at once, before another waiter does.
        # The last pause is cut to the deadline and followed by one more attempt, so that the
        # wait gives up at its timeout, neither a full pause early nor late.
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _timeout(model_name, timeout_s, cause)
        time.sleep(min(pause, remaining))
        pause = min(pause * 1.5, _MAX_POLL_S)


def _create(client, lock_name: str, model_name: str, owner: str, ttl_s: float) -> bool:
    """Whether this process created the lock model (False: it exists)."""
    from mlflow.exceptions import MlflowException

    tags = {"owner": owner, "expires_at": f"{time.time() + ttl_s:.3f}", "machine": _machine()}
    try:
        client.create_registered_model(
            lock_name, tags=tags, description=f"Promotion lock for {model_name}; do not use."
        )
        return True
    except MlflowException as exc:
        # MLflow's SQL store answers a duplicate name by re-reading the existing model: when
        # the holder released it in between, that read fails with RESOURCE_DOES_NOT_EXIST.
        # Either way the lock was busy a moment ago and may be free now: try again.
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
            raise
        return False


def _remove(client, model_name: str, lock_name: str, holder: str, squatted: bool) -> str | None:
    """Remove a stale or squatted lock model; None when the lock is free (or has moved), else
    why it is not."""
    from mlflow.exceptions import MlflowException

    what = "held by a party that may not promote" if squatted else "stale"
    log.warning("taking over the promotion lock of %s (%s)", holder, what)
    try:
        client.delete_registered_model(lock_name)
        return None
    except MlflowException as exc:
        if squatted:
            # Its owner alone may delete it: move the lock to a name nobody could foresee.
            moved = f"{model_name}{LOCK_SUFFIX}-{uuid.uuid4().hex[:12]}"
            log.warning(
                "cannot remove %r (%s); the lock moves to %r", lock_name, exc.message, moved
            )
            client.set_registered_model_tag(model_name, NAME_TAG, moved)
            return None
        # No permission to delete (403) or a failing server (5xx): wait and retry like for a
        # busy lock, so that neither the store nor the timeout is overrun.
        log.warning("could not remove the stale promotion lock: %s", exc.message)
        return (
            f"the lock of {holder} is stale but could not be removed ({exc.error_code}: "
            f"{exc.message}); delete the registered model {lock_name!r} with an account that may"
        )


@contextlib.contextmanager
def promotion_lock(
    model_name: str,
    *,
    registry_uri: str | None = None,
    timeout_s: float = 120.0,
    ttl_s: float | None = None,
    grace_s: float = DEFAULT_GRACE_S,
) -> Iterator[_Held]:
    """Hold the promotion lock of ``model_name``; TimeoutError after ``timeout_s`` of waiting.

    ``ttl_s`` is the lease (default ``CARS_ML_PROMOTE_LOCK_TTL_S`` or 60 s): a holder that stops
    renewing it for that long is considered gone. ``grace_s``: how long a lock model may stay
    unconfirmed on the promoted model before it counts as squatted.
    """
    import mlflow
    from mlflow import MlflowClient

    ttl_s = lease_ttl_s(ttl_s)
    if not timeout_s >= 0:
        raise ValueError(f"timeout_s must be a number of seconds >= 0, got {timeout_s!r}")
    registry_uri = registry_uri or mlflow.get_registry_uri()
    # The lock makes registry calls only. Its client's tracking side points at the same store,
    # so that a lock given a registry URI never opens (and creates) the default ./mlflow.db.
    client = MlflowClient(tracking_uri=registry_uri, registry_uri=registry_uri)
    owner = _owner()
    lock_name, written_at = _acquire(client, model_name, owner, timeout_s, ttl_s, grace_s)
    held = _Held(owner, lock_name, client, model_name)
    if time.monotonic() - written_at > ttl_s / 4:
        # A slow create (a cold or busy server) used up much of the lease: renew it before the
        # caller starts, or a waiter could find the lock born stale.
        client.set_registered_model_tag(lock_name, "expires_at", f"{time.time() + ttl_s:.3f}")
        written_at = time.monotonic()
    stop = threading.Event()
    # Its own client: the heartbeat runs beside the move's writes.
    beat_client = MlflowClient(tracking_uri=registry_uri, registry_uri=registry_uri)
    beat = threading.Thread(
        target=_heartbeat,
        args=(held, beat_client, ttl_s, stop, written_at),
        daemon=True,
        name="lock-lease",
    )
    beat.start()
    log.info("promotion lock of %s taken (%s)", model_name, owner)
    try:
        yield held
    finally:
        stop.set()
        beat.join(timeout=ttl_s)  # A renewal stuck in retries must not hold up the release.
        if _lock_state(client, lock_name)[0] == owner:
            client.delete_registered_model(lock_name)
        else:
            log.error("promotion lock %r was taken over while held", lock_name)
