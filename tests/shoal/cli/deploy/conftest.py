from tests.shoal.cli.deploy.deploybed import base, everything, kubectl, rendered  # noqa: F401  (fixtures)
