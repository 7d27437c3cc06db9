"""The controller's Prometheus metrics, on a registry of its own (istiod's names where they exist)."""
from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass(frozen=True)
class ControllerMetrics:
    registry: CollectorRegistry
    pushes: Counter
    push_resources: Counter
    convergence: Histogram
    connected: Gauge
    rejects: Counter
    bad_requests: Counter
    auth_failures: Counter
    certs_issued: Counter
    cert_errors: Counter
    model_errors: Gauge
    resources: Gauge
    generation: Gauge
    source_events: Counter
    source_errors: Counter

    @classmethod
    def create(cls) -> "ControllerMetrics":
        r = CollectorRegistry()
        return cls(
            registry=r,
            pushes=Counter("pilot_xds_pushes", "Config pushes sent to nodes", ["component"],
                           registry=r),
            push_resources=Counter("shoal_controller_pushed_resources",
                                   "Resources (upserts + removals) carried by pushes",
                                   ["component"], registry=r),
            convergence=Histogram(
                "pilot_proxy_convergence_time",
                "Seconds from a model change to the node's ACK of the push carrying it",
                buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                registry=r),
            connected=Gauge("pilot_xds", "Connected config streams", ["component"], registry=r),
            rejects=Counter("pilot_total_xds_rejects", "Pushes NACKed by nodes", ["component"],
                            registry=r),
            bad_requests=Counter("shoal_controller_bad_requests",
                                 "Malformed or out-of-protocol messages refused", ["rpc"],
                                 registry=r),
            auth_failures=Counter("shoal_controller_auth_failures",
                                  "Calls refused because the node did not authenticate",
                                  ["rpc", "reason"], registry=r),
            certs_issued=Counter("citadel_server_success_cert_issuance_count",
                                 "Workload certificates issued", registry=r),
            cert_errors=Counter("citadel_server_csr_sign_err_count",
                                "Certificate requests refused", ["reason"], registry=r),
            model_errors=Gauge("shoal_controller_object_errors",
                               "Objects the model currently rejects", registry=r),
            resources=Gauge("shoal_controller_resources", "Resources in the model", ["type"],
                            registry=r),
            generation=Gauge("shoal_controller_config_generation",
                             "The model's config generation (the version pushed)", registry=r),
            source_events=Counter("shoal_controller_source_events",
                                  "Watch events received", ["source", "kind"], registry=r),
            source_errors=Counter("shoal_controller_source_errors",
                                  "List/watch failures (reconnects, relists)", ["source", "kind"],
                                  registry=r),
        )
