"""The ``CertificateAuthority`` gRPC service: authenticated nodes get SVIDs for their pods."""
from __future__ import annotations

import datetime as dt
import logging
from typing import Callable

import grpc

from shoal.api import config_pb2 as pb
from shoal.controller.ca import CertificateAuthority, CsrError, parse_spiffe_from_csr
from shoal.controller.metrics import ControllerMetrics
from shoal.controller.model import MeshModel
from shoal.controller.rpcguard import TooLarge, decoder
from shoal.ratelog import LogLimiter, held_note

log = logging.getLogger(__name__)

SERVICE_NAME = "shoal.config.v1.CertificateAuthority"
MAX_CSR_BYTES = 16 * 1024
# The request adds the SPIFFE ID and the TTL to the CSR; TrustBundle requests are empty.
MAX_CSR_REQUEST_BYTES = MAX_CSR_BYTES + 1024
MAX_TRUST_BUNDLE_REQUEST_BYTES = 1024


class CertificateService:
    def __init__(self, ca: CertificateAuthority, model: MeshModel,
                 metrics: ControllerMetrics,
                 not_issuing: Callable[[], str | None] = lambda: None) -> None:
        """``not_issuing``: why this replica may not sign now (a standby, or a leader whose
        Lease is not fresh), or None. Checked for every request, so issuance stops the
        moment the Lease may have passed to another replica, however late the loop runs."""
        self.ca, self.model, self.metrics = ca, model, metrics
        self.not_issuing = not_issuing
        self._log_limiter = LogLimiter()   # refusals: every one counted, a line a second per reason

    def handler(self) -> grpc.GenericRpcHandler:
        """Callers are authenticated by NodeAuthInterceptor before a body is read; the
        handlers get the proven node as a third argument."""
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "SignCertificate": grpc.unary_unary_rpc_method_handler(
                self.sign, request_deserializer=decoder(
                    pb.CertificateRequest, "SignCertificate", MAX_CSR_REQUEST_BYTES, self.metrics),
                response_serializer=pb.CertificateResponse.SerializeToString),
            "TrustBundle": grpc.unary_unary_rpc_method_handler(
                self.trust_bundle, request_deserializer=decoder(
                    pb.TrustBundleRequest, "TrustBundle", MAX_TRUST_BUNDLE_REQUEST_BYTES,
                    self.metrics),
                response_serializer=pb.TrustBundleResponse.SerializeToString),
        })

    async def sign(self, request: pb.CertificateRequest, context, node: str) -> pb.CertificateResponse:
        if isinstance(request, TooLarge) or len(request.csr_pem) > MAX_CSR_BYTES:
            await self._refuse(context, node, "too_large", grpc.StatusCode.RESOURCE_EXHAUSTED,
                               str(request) if isinstance(request, TooLarge)
                               else f"CSR larger than {MAX_CSR_BYTES} bytes")
        refusal = self.not_issuing()
        if refusal is not None:   # UNAVAILABLE: the client retries on another replica
            await self._refuse(context, node, "not_leader", grpc.StatusCode.UNAVAILABLE, refusal)
        spiffe_id = request.spiffe_id or parse_spiffe_from_csr(request.csr_pem)
        if spiffe_id not in self.model.identities_for_caller(node):
            await self._refuse(context, node, "not_on_node", grpc.StatusCode.PERMISSION_DENIED,
                               f"no pod of {spiffe_id or '<no identity>'} is scheduled on "
                               f"node {node}")
        ttl = dt.timedelta(seconds=request.ttl_seconds) if request.ttl_seconds else None
        try:
            signed = self.ca.sign(request.csr_pem, spiffe_id, ttl)
        except CsrError as err:
            await self._refuse(context, node, "bad_csr", grpc.StatusCode.INVALID_ARGUMENT, str(err))
        self.metrics.certs_issued.inc()
        log.info("issued %s to node %s (serial %x, until %s)", spiffe_id, node, signed.serial,
                 signed.not_after.isoformat())
        return pb.CertificateResponse(cert_chain_pem=signed.chain_pem, roots_pem=signed.roots_pem)

    async def _refuse(self, context, node: str, reason: str, code: grpc.StatusCode,
                      message: str) -> None:
        self.metrics.cert_errors.labels(reason).inc()
        if (held := self._log_limiter.allow(reason)) is not None:
            log.warning("certificate for node %s refused: %s%s", node, message, held_note(held))
        await context.abort(code, message)

    async def trust_bundle(self, request: pb.TrustBundleRequest, context,
                           node: str) -> pb.TrustBundleResponse:
        if isinstance(request, TooLarge):
            self.metrics.cert_errors.labels("too_large").inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(request))
        return pb.TrustBundleResponse(roots_pem=self.ca.roots_pem)
