"""``shoal ui``: a read-only web UI (service map, live flows) over the Hubble relay.

- ``graph.ServiceMap``: flows folded into workload/service nodes and edges (pure).
- ``feed.FlowFeed``: one follow stream on the relay feeding the map and a recent-flows ring.
- ``server.build_app``: the aiohttp app (GET only) serving the page and its JSON.
- ``static/``: the page; ``cytoscape.min.js`` is vendored (see ``static/VENDOR.md``).
"""
