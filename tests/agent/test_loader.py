"""The loader's pinned maps: one of another layout is replaced on adoption."""
from __future__ import annotations

import pytest


@pytest.mark.root
def test_pinned_map_with_another_layout_is_replaced_on_adoption(tmp_path):
    import os
    import shutil
    from pathlib import Path

    from shoal.agent.loader import PinnedMaps
    from shoal.datapath import bpfsys
    from shoal.datapath.structs import MAP_BY_NAME
    if not Path("/sys/fs/bpf").is_mount():
        pytest.skip("bpffs not mounted")
    pin_dir = Path(f"/sys/fs/bpf/shoal-t{os.getpid()}-maps/node-1")
    try:
        first = PinnedMaps(pin_dir)
        first.close()
        spec = MAP_BY_NAME["cost_hist"]
        (pin_dir / "cost_hist").unlink()
        old = bpfsys.map_create(spec.map_type, spec.key_size, spec.value_size, 32, "cost_hist")
        bpfsys.obj_pin(old, pin_dir / "cost_hist")
        os.close(old)
        again = PinnedMaps(pin_dir)
        assert again.replaced == ["cost_hist"] and "ipcache" in again.adopted
        assert bpfsys.map_info(again.fds["cost_hist"]).max_entries == spec.max_entries
        again.close()
    finally:
        shutil.rmtree(pin_dir.parent, ignore_errors=True)
