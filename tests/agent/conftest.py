"""Fixtures of the agent's tests (the bed itself lives in agentbed.py)."""
from tests.agent.agentbed import agent_bed, datapath, events, meshed_a, meshed_b  # noqa: F401  (fixtures)
