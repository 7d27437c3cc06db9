"""Authorization policy evaluation shared by the node proxy (L4) and the waypoint (L7).

- ``match``: Istio's matching rules (strings, principals, IP blocks).
- ``authz``: the DENY-then-ALLOW order and the rule shape (``decide``, ``PartMatchers``).
"""
