"""Leader election on a ``coordination.k8s.io/v1`` Lease (Kubernetes mode, 2+ replicas).

Only the leader writes (the CA Secret, the identity ConfigMap, the trust bundle) and issues
certificates: identity numbers must come from one allocator, and one signer answers for the
Lease. A standby serves reads (the config stream, ``/status``) from its own watch and the
leader's identity table, and takes over once the Lease has not been renewed for its duration.

As client-go's leaderelection, expiry is judged on this process's monotonic clock from the
moment it last saw the Lease record change, never by comparing wall clocks across machines.
The leader renews every ``retry_period``; if it cannot renew for ``renew_deadline`` (shorter
than the lease duration), it gives up leadership before anyone else may take it, and the
controller stops issuing at once.

``LeaseState.decide`` is the pure decision; ``LeaseElector`` the asyncio/API driver.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

LEASE_DURATION = 8.0    # a standby takes over at most this (+ RETRY_PERIOD) after the last renewal
RENEW_DEADLINE = 5.0    # the leader stops leading when it could not renew for this long
RETRY_PERIOD = 1.0     # renew / retry interval


@dataclass(frozen=True)
class LeaseRecord:
    holder: str
    renew_time: str          # as stored (changes on every renewal: what "seen to change" means)
    duration: float
    transitions: int


@dataclass
class LeaseState:
    """What this candidate has observed of the Lease; ``decide`` says what to do next."""

    identity: str
    observed: LeaseRecord | None = None
    observed_at: float = 0.0            # monotonic time the record was last seen to change

    def observe(self, record: LeaseRecord | None, now: float) -> None:
        if record != self.observed:
            self.observed, self.observed_at = record, now

    def decide(self, now: float) -> str:
        """``create`` (no Lease), ``renew`` (ours), ``take`` (free or expired), or ``wait``."""
        record = self.observed
        if record is None:
            return "create"
        if record.holder == self.identity:
            return "renew"
        if not record.holder or now >= self.observed_at + record.duration:
            return "take"
        return "wait"


def _micro(value: dt.datetime | str | None = None) -> str | None:
    """A Kubernetes MicroTime (RFC 3339, microseconds, UTC); now when ``value`` is None."""
    if isinstance(value, str):
        return value
    value = value or dt.datetime.now(dt.timezone.utc)
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    def __init__(self, api_client, namespace: str, name: str, identity: str,
                 lease_duration: float = LEASE_DURATION, renew_deadline: float = RENEW_DEADLINE,
                 retry_period: float = RETRY_PERIOD) -> None:
        from kubernetes_asyncio import client

        if not retry_period < renew_deadline < lease_duration:
            raise ValueError("need retry_period < renew_deadline < lease_duration")
        self._api = client.CoordinationV1Api(api_client)
        self._client = client
        self.namespace, self.name = namespace, name
        self.state = LeaseState(identity)
        self.lease_duration, self.renew_deadline = lease_duration, renew_deadline
        self.retry_period = retry_period
        self.leading = False
        self.last_renewed = 0.0

    @property
    def identity(self) -> str:
        return self.state.identity

    @property
    def holder(self) -> str:
        return self.state.observed.holder if self.state.observed else ""

    def _record(self, lease) -> LeaseRecord:
        spec = lease.spec
        renew = spec.renew_time
        return LeaseRecord(holder=spec.holder_identity or "",
                           renew_time=renew.isoformat() if hasattr(renew, "isoformat") else str(renew or ""),
                           duration=float(spec.lease_duration_seconds or self.lease_duration),
                           transitions=int(spec.lease_transitions or 0))

    def _spec(self, previous=None):
        now = _micro()
        taking = previous is None or previous.holder_identity != self.identity
        return self._client.V1LeaseSpec(
            holder_identity=self.identity, lease_duration_seconds=int(self.lease_duration),
            acquire_time=now if taking else _micro(previous.acquire_time), renew_time=now,
            lease_transitions=(0 if previous is None else int(previous.lease_transitions or 0)
                               + (1 if taking and previous.holder_identity else 0)))

    async def try_acquire_or_renew(self) -> bool:
        """One round: True when this candidate holds the Lease afterwards."""
        from aiohttp import ClientError
        from kubernetes_asyncio.client.exceptions import ApiException

        timeout = self.retry_period
        try:
            try:
                lease = await self._api.read_namespaced_lease(self.name, self.namespace,
                                                              _request_timeout=timeout)
            except ApiException as err:
                if err.status != 404:
                    raise
                lease = None
            now = time.monotonic()
            self.state.observe(self._record(lease) if lease else None, now)
            action = self.state.decide(now)
            if action == "wait":
                return False
            if action == "create":
                body = self._client.V1Lease(
                    metadata=self._client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                    spec=self._spec())
                lease = await self._api.create_namespaced_lease(self.namespace, body,
                                                                _request_timeout=timeout)
            else:
                if action == "take":
                    log.info("Lease %s/%s: taking over from %r", self.namespace, self.name,
                             self.holder or "<released>")
                lease.spec = self._spec(lease.spec)
                lease = await self._api.replace_namespaced_lease(self.name, self.namespace, lease,
                                                                 _request_timeout=timeout)
        except ApiException as err:
            if err.status == 409:   # someone else wrote it first: look again next round
                return False
            log.warning("Lease %s/%s: %s %s", self.namespace, self.name, err.status, err.reason)
            return False
        except (ClientError, OSError, asyncio.TimeoutError) as err:
            log.warning("Lease %s/%s: API server unreachable: %s", self.namespace, self.name, err)
            return False
        self.state.observe(self._record(lease), time.monotonic())
        self.last_renewed = time.monotonic()
        return True

    async def acquire(self) -> None:
        """Returns once this candidate leads."""
        while not await self.try_acquire_or_renew():
            await asyncio.sleep(self.retry_period)
        self.leading = True
        log.info("Lease %s/%s: leading as %s", self.namespace, self.name, self.identity)

    async def keep(self) -> None:
        """Renews while leading; returns when leadership is lost (not renewed within
        ``renew_deadline``, or taken by someone else)."""
        while True:
            await asyncio.sleep(self.retry_period)
            if await self.try_acquire_or_renew():
                continue
            if self.holder and self.holder != self.identity:
                log.error("Lease %s/%s: now held by %s", self.namespace, self.name, self.holder)
                break
            if time.monotonic() - self.last_renewed >= self.renew_deadline:
                log.error("Lease %s/%s: not renewed for %.0f s", self.namespace, self.name,
                          time.monotonic() - self.last_renewed)
                break
        self.leading = False

    async def release(self) -> None:
        """Graceful stop: hand the Lease over at once instead of after its duration."""
        from aiohttp import ClientError
        from kubernetes_asyncio.client.exceptions import ApiException

        if not self.leading:
            return
        self.leading = False
        try:
            lease = await self._api.read_namespaced_lease(self.name, self.namespace,
                                                          _request_timeout=self.retry_period)
            if lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = ""
                lease.spec.renew_time = _micro()
                lease.spec.acquire_time = _micro(lease.spec.acquire_time) if lease.spec.acquire_time else None
                await self._api.replace_namespaced_lease(self.name, self.namespace, lease,
                                                         _request_timeout=self.retry_period)
                log.info("Lease %s/%s: released", self.namespace, self.name)
        except (ApiException, ClientError, OSError, asyncio.TimeoutError) as err:
            log.warning("Lease %s/%s: not released (%s); it expires by itself", self.namespace,
                        self.name, err)
