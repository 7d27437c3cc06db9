"""Authorization policy evaluation shared by the node proxy (L4) and the waypoint (L7).

- ``match``: Istio's matching rules (strings, principals, IP blocks).
"""
