from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WaypointRef(_message.Message):
    __slots__ = ("namespace", "name")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    name: str
    def __init__(self, namespace: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class Workload(_message.Message):
    __slots__ = ("uid", "name", "namespace", "service_account", "node", "ip", "identity", "spiffe_id", "meshed", "waypoint", "protocol", "labels", "canonical_service", "mtls_mode", "ips", "workload_name", "workload_kind")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    UID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    MESHED_FIELD_NUMBER: _ClassVar[int]
    WAYPOINT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CANONICAL_SERVICE_FIELD_NUMBER: _ClassVar[int]
    MTLS_MODE_FIELD_NUMBER: _ClassVar[int]
    IPS_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_NAME_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_KIND_FIELD_NUMBER: _ClassVar[int]
    uid: str
    name: str
    namespace: str
    service_account: str
    node: str
    ip: str
    identity: int
    spiffe_id: str
    meshed: bool
    waypoint: WaypointRef
    protocol: str
    labels: _containers.ScalarMap[str, str]
    canonical_service: str
    mtls_mode: str
    ips: _containers.RepeatedScalarFieldContainer[str]
    workload_name: str
    workload_kind: str
    def __init__(self, uid: _Optional[str] = ..., name: _Optional[str] = ..., namespace: _Optional[str] = ..., service_account: _Optional[str] = ..., node: _Optional[str] = ..., ip: _Optional[str] = ..., identity: _Optional[int] = ..., spiffe_id: _Optional[str] = ..., meshed: _Optional[bool] = ..., waypoint: _Optional[_Union[WaypointRef, _Mapping]] = ..., protocol: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., canonical_service: _Optional[str] = ..., mtls_mode: _Optional[str] = ..., ips: _Optional[_Iterable[str]] = ..., workload_name: _Optional[str] = ..., workload_kind: _Optional[str] = ...) -> None: ...

class ServicePort(_message.Message):
    __slots__ = ("name", "port", "target_port", "protocol", "app_protocol")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    TARGET_PORT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    APP_PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    name: str
    port: int
    target_port: int
    protocol: str
    app_protocol: str
    def __init__(self, name: _Optional[str] = ..., port: _Optional[int] = ..., target_port: _Optional[int] = ..., protocol: _Optional[str] = ..., app_protocol: _Optional[str] = ...) -> None: ...

class Service(_message.Message):
    __slots__ = ("name", "namespace", "vip", "ports", "endpoints", "waypoint", "vips", "ip_families", "ip_family_policy")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    VIP_FIELD_NUMBER: _ClassVar[int]
    PORTS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    WAYPOINT_FIELD_NUMBER: _ClassVar[int]
    VIPS_FIELD_NUMBER: _ClassVar[int]
    IP_FAMILIES_FIELD_NUMBER: _ClassVar[int]
    IP_FAMILY_POLICY_FIELD_NUMBER: _ClassVar[int]
    name: str
    namespace: str
    vip: str
    ports: _containers.RepeatedCompositeFieldContainer[ServicePort]
    endpoints: _containers.RepeatedScalarFieldContainer[str]
    waypoint: WaypointRef
    vips: _containers.RepeatedScalarFieldContainer[str]
    ip_families: _containers.RepeatedScalarFieldContainer[str]
    ip_family_policy: str
    def __init__(self, name: _Optional[str] = ..., namespace: _Optional[str] = ..., vip: _Optional[str] = ..., ports: _Optional[_Iterable[_Union[ServicePort, _Mapping]]] = ..., endpoints: _Optional[_Iterable[str]] = ..., waypoint: _Optional[_Union[WaypointRef, _Mapping]] = ..., vips: _Optional[_Iterable[str]] = ..., ip_families: _Optional[_Iterable[str]] = ..., ip_family_policy: _Optional[str] = ...) -> None: ...

class Source(_message.Message):
    __slots__ = ("principals", "not_principals", "namespaces", "not_namespaces", "ip_blocks", "not_ip_blocks")
    PRINCIPALS_FIELD_NUMBER: _ClassVar[int]
    NOT_PRINCIPALS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    NOT_NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    IP_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NOT_IP_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    principals: _containers.RepeatedScalarFieldContainer[str]
    not_principals: _containers.RepeatedScalarFieldContainer[str]
    namespaces: _containers.RepeatedScalarFieldContainer[str]
    not_namespaces: _containers.RepeatedScalarFieldContainer[str]
    ip_blocks: _containers.RepeatedScalarFieldContainer[str]
    not_ip_blocks: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, principals: _Optional[_Iterable[str]] = ..., not_principals: _Optional[_Iterable[str]] = ..., namespaces: _Optional[_Iterable[str]] = ..., not_namespaces: _Optional[_Iterable[str]] = ..., ip_blocks: _Optional[_Iterable[str]] = ..., not_ip_blocks: _Optional[_Iterable[str]] = ...) -> None: ...

class Operation(_message.Message):
    __slots__ = ("ports", "not_ports", "methods", "not_methods", "paths", "not_paths", "hosts", "not_hosts")
    PORTS_FIELD_NUMBER: _ClassVar[int]
    NOT_PORTS_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    NOT_METHODS_FIELD_NUMBER: _ClassVar[int]
    PATHS_FIELD_NUMBER: _ClassVar[int]
    NOT_PATHS_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    NOT_HOSTS_FIELD_NUMBER: _ClassVar[int]
    ports: _containers.RepeatedScalarFieldContainer[int]
    not_ports: _containers.RepeatedScalarFieldContainer[int]
    methods: _containers.RepeatedScalarFieldContainer[str]
    not_methods: _containers.RepeatedScalarFieldContainer[str]
    paths: _containers.RepeatedScalarFieldContainer[str]
    not_paths: _containers.RepeatedScalarFieldContainer[str]
    hosts: _containers.RepeatedScalarFieldContainer[str]
    not_hosts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ports: _Optional[_Iterable[int]] = ..., not_ports: _Optional[_Iterable[int]] = ..., methods: _Optional[_Iterable[str]] = ..., not_methods: _Optional[_Iterable[str]] = ..., paths: _Optional[_Iterable[str]] = ..., not_paths: _Optional[_Iterable[str]] = ..., hosts: _Optional[_Iterable[str]] = ..., not_hosts: _Optional[_Iterable[str]] = ...) -> None: ...

class Condition(_message.Message):
    __slots__ = ("key", "values", "not_values")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    NOT_VALUES_FIELD_NUMBER: _ClassVar[int]
    key: str
    values: _containers.RepeatedScalarFieldContainer[str]
    not_values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, key: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ..., not_values: _Optional[_Iterable[str]] = ...) -> None: ...

class Rule(_message.Message):
    __slots__ = ("sources", "operations", "conditions")
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    sources: _containers.RepeatedCompositeFieldContainer[Source]
    operations: _containers.RepeatedCompositeFieldContainer[Operation]
    conditions: _containers.RepeatedCompositeFieldContainer[Condition]
    def __init__(self, sources: _Optional[_Iterable[_Union[Source, _Mapping]]] = ..., operations: _Optional[_Iterable[_Union[Operation, _Mapping]]] = ..., conditions: _Optional[_Iterable[_Union[Condition, _Mapping]]] = ...) -> None: ...

class TargetRef(_message.Message):
    __slots__ = ("group", "kind", "name")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    group: str
    kind: str
    name: str
    def __init__(self, group: _Optional[str] = ..., kind: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class Authorization(_message.Message):
    __slots__ = ("name", "namespace", "action", "selector", "rules", "target_refs")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    TARGET_REFS_FIELD_NUMBER: _ClassVar[int]
    name: str
    namespace: str
    action: str
    selector: _containers.ScalarMap[str, str]
    rules: _containers.RepeatedCompositeFieldContainer[Rule]
    target_refs: _containers.RepeatedCompositeFieldContainer[TargetRef]
    def __init__(self, name: _Optional[str] = ..., namespace: _Optional[str] = ..., action: _Optional[str] = ..., selector: _Optional[_Mapping[str, str]] = ..., rules: _Optional[_Iterable[_Union[Rule, _Mapping]]] = ..., target_refs: _Optional[_Iterable[_Union[TargetRef, _Mapping]]] = ...) -> None: ...

class Waypoint(_message.Message):
    __slots__ = ("name", "namespace", "ip", "service_account", "spiffe_id", "uid", "ips")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    SERVICE_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    IPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    namespace: str
    ip: str
    service_account: str
    spiffe_id: str
    uid: str
    ips: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., namespace: _Optional[str] = ..., ip: _Optional[str] = ..., service_account: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., uid: _Optional[str] = ..., ips: _Optional[_Iterable[str]] = ...) -> None: ...

class KubeObject(_message.Message):
    __slots__ = ("kind", "namespace", "name", "json")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    kind: str
    namespace: str
    name: str
    json: str
    def __init__(self, kind: _Optional[str] = ..., namespace: _Optional[str] = ..., name: _Optional[str] = ..., json: _Optional[str] = ...) -> None: ...

class Resource(_message.Message):
    __slots__ = ("type", "name", "version", "workload", "service", "authorization", "waypoint", "object")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    AUTHORIZATION_FIELD_NUMBER: _ClassVar[int]
    WAYPOINT_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    type: str
    name: str
    version: str
    workload: Workload
    service: Service
    authorization: Authorization
    waypoint: Waypoint
    object: KubeObject
    def __init__(self, type: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., workload: _Optional[_Union[Workload, _Mapping]] = ..., service: _Optional[_Union[Service, _Mapping]] = ..., authorization: _Optional[_Union[Authorization, _Mapping]] = ..., waypoint: _Optional[_Union[Waypoint, _Mapping]] = ..., object: _Optional[_Union[KubeObject, _Mapping]] = ...) -> None: ...

class ErrorDetail(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class DeltaRequest(_message.Message):
    __slots__ = ("node", "component", "initial_resource_versions", "response_nonce", "error_detail", "rejected", "build_version")
    class InitialResourceVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_FIELD_NUMBER: _ClassVar[int]
    COMPONENT_FIELD_NUMBER: _ClassVar[int]
    INITIAL_RESOURCE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_NONCE_FIELD_NUMBER: _ClassVar[int]
    ERROR_DETAIL_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    BUILD_VERSION_FIELD_NUMBER: _ClassVar[int]
    node: str
    component: str
    initial_resource_versions: _containers.ScalarMap[str, str]
    response_nonce: str
    error_detail: ErrorDetail
    rejected: _containers.RepeatedScalarFieldContainer[str]
    build_version: str
    def __init__(self, node: _Optional[str] = ..., component: _Optional[str] = ..., initial_resource_versions: _Optional[_Mapping[str, str]] = ..., response_nonce: _Optional[str] = ..., error_detail: _Optional[_Union[ErrorDetail, _Mapping]] = ..., rejected: _Optional[_Iterable[str]] = ..., build_version: _Optional[str] = ...) -> None: ...

class DeltaResponse(_message.Message):
    __slots__ = ("system_version", "nonce", "resources", "removed")
    SYSTEM_VERSION_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    system_version: str
    nonce: str
    resources: _containers.RepeatedCompositeFieldContainer[Resource]
    removed: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, system_version: _Optional[str] = ..., nonce: _Optional[str] = ..., resources: _Optional[_Iterable[_Union[Resource, _Mapping]]] = ..., removed: _Optional[_Iterable[str]] = ...) -> None: ...

class CertificateRequest(_message.Message):
    __slots__ = ("csr_pem", "spiffe_id", "ttl_seconds")
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    csr_pem: str
    spiffe_id: str
    ttl_seconds: int
    def __init__(self, csr_pem: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class CertificateResponse(_message.Message):
    __slots__ = ("cert_chain_pem", "roots_pem")
    CERT_CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    ROOTS_PEM_FIELD_NUMBER: _ClassVar[int]
    cert_chain_pem: str
    roots_pem: str
    def __init__(self, cert_chain_pem: _Optional[str] = ..., roots_pem: _Optional[str] = ...) -> None: ...

class TrustBundleRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TrustBundleResponse(_message.Message):
    __slots__ = ("roots_pem",)
    ROOTS_PEM_FIELD_NUMBER: _ClassVar[int]
    roots_pem: str
    def __init__(self, roots_pem: _Optional[str] = ...) -> None: ...
