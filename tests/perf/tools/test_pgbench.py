"""pgbench: TPS and failures read."""
import pytest

from shoal.perf.tools import ToolOutputError, pgbench

PGBENCH_OUTPUT = """transaction type: <builtin: select only>
number of clients: 8
number of transactions actually processed: 41250
number of failed transactions: 0 (0.000%)
latency average = 0.580 ms
initial connection time = 12.345 ms
tps = 13792.118852 (without initial connection time)
"""



def test_pgbench_tps_and_failures():
    assert pgbench.tps(PGBENCH_OUTPUT) == pytest.approx(13792.118852)
    with pytest.raises(ToolOutputError, match="failed transactions"):
        pgbench.tps(PGBENCH_OUTPUT.replace("failed transactions: 0", "failed transactions: 3"))
    with pytest.raises(ToolOutputError, match="no tps"):
        pgbench.tps('pgbench: error: connection to server at "10.0.0.2", port 5432 failed')
    argv = pgbench.select_argv("10.0.0.2", 5)
    assert "-S" in argv and argv[argv.index("-c") + 1] == "8"
