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


def test_a_following_allocator_never_allocates_until_it_leads():
    """A standby's allocator: unknown pairs are withheld (never numbered by the standby),
    known ones come from the leader's table; once leading it numbers after that table."""
    import pytest

    from shoal.controller.identity import IdentityPending

    ids = IdentityAllocator(None, external=True, following=True)
    ids.restore([(300, "demo", "web")])
    assert ids.get("demo", "web") == 300
    with pytest.raises(IdentityPending, match="demo/api"):
        ids.get("demo", "api")
    assert ids.withheld == {("demo", "api")} and ids.take_pending() == []
    ids.restore([(300, "demo", "web"), (301, "demo", "api")])
    assert ids.get("demo", "api") == 301
    ids.lead()
    assert ids.get("demo", "db") == 302 and ids.take_pending() == [(302, "demo", "db")]
