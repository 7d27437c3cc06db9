"""``shoal observe`` / ``shoal list nodes``: Hubble's CLI experience against the relay.

- ``request``: Hubble's observe flags -> ``observer.GetFlowsRequest`` (pure);
- ``printers``: compact / json / jsonpb / dict / table, in Hubble's formats (pure);
- ``client``: the gRPC calls to the relay;
- ``cli``: the click commands the lead registers (``observe``, ``list_cmd``).
"""
