"""The config stream's data-path side: the model, the state it fills, and the client.

* ``shoal.xds.model``: frozen dataclasses (Workload, Service, Authorization, Waypoint).
* ``shoal.xds.convert``: model <-> protobuf, validating what arrives.
* ``shoal.xds.delta``: I/O-free delta bookkeeping (versions, nonces, ACK/NACK, resume)
  for both ends of the stream.
* ``shoal.xds.state.ConfigState``: what the data path reads; written only by the client.
* ``shoal.xds.client.ConfigClient``: the gRPC driver (stream, reconnect, CA calls).
"""
