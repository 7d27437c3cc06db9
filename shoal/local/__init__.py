"""The local development cluster: namespaces and cgroups as nodes and pods (``cluster``,
``linux``, ``topology``), the embedded kubelet, the waypoint launcher, the local
controller entry point that assembles them (``controller``), and the demo. Only the CLI
imports this package."""
