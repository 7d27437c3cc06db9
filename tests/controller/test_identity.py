"""The identity allocator's log: a torn last line is survived, numbers are never reused."""
from shoal.controller.identity import FIRST_IDENTITY, IdentityAllocator


def test_identity_log_survives_a_torn_line_and_never_reuses(tmp_path):
    path = tmp_path / "identities"
    ids = IdentityAllocator(path)
    a, b = ids.get("demo", "web"), ids.get("demo", "db")
    assert (a, b) == (FIRST_IDENTITY, FIRST_IDENTITY + 1)
    uncommitted = IdentityAllocator(path)
    assert len(uncommitted) == 0          # nothing is durable before commit()
    ids.commit()
    with open(path, "a") as f:
        f.write("25")                     # a crash mid-write
    again = IdentityAllocator(path)
    assert again.lookup("demo", "web") == a and again.lookup("demo", "db") == b
    assert again.get("demo", "new") == b + 1
