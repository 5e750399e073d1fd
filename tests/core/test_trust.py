"""core.trust: tokens and identities made with the front's secrets, and nothing else."""

from __future__ import annotations

from pspnet.core import wire
from pspnet.core.trust import Refusals, Trust, new_secret


def test_a_token_holds_only_for_its_request_attempt_and_executor():
    trust, other = Trust(new_secret()), Trust(new_secret())
    token = trust.token("1f", 0, "executor-0-42")
    assert trust.holds(wire.Request("1f", "/a.jpg", token=token), "executor-0-42")
    for request, executor in ((wire.Request("1f", "/a.jpg", token=token), "executor-1-43"),
                              (wire.Request("20", "/a.jpg", token=token), "executor-0-42"),
                              (wire.Request("1f", "/a.jpg", attempt=1, token=token),
                               "executor-0-42"),
                              (wire.Request("1f", "/a.jpg"), "executor-0-42"),
                              (wire.Request("1f", "/a.jpg", token=other.token(
                                  "1f", 0, "executor-0-42")), "executor-0-42")):
        assert not trust.holds(request, executor), (request, executor)
    answer = wire.Result("1f", 0, wire.OK, token=token)
    assert trust.answers(answer, 0, "executor-0-42")
    assert not trust.answers(answer, 1, "executor-0-42")
    assert not trust.answers(answer, 0, None)


def test_identities_prove_a_name_and_whose_worker_it_is():
    """With `own` (tcp), the front's workers' control identities are made with a secret
    remote workers lack: a remote worker (the shared secret only) proves its own names,
    never as one of the front's; credits identities verify across both."""
    shared, own = new_secret(), new_secret()
    front, remote = Trust(shared, own), Trust(shared)
    assert front.origin(front.identity("executor-0-42")) == ("executor-0-42", True)
    assert front.origin(front.identity("executor-0-42", "runner")) is None   # no such socket
    assert front.origin(front.identity("preprocess-0-9", "vouch")) == ("preprocess-0-9", True)
    assert front.origin(remote.identity("executor-0-42")) == ("executor-0-42", False)
    assert remote.name_of(front.identity("postprocess-0-7", "credits")) == "postprocess-0-7"
    assert remote.name_of(front.identity("executor-0-42")) is None
    ipc = Trust(new_secret())
    assert ipc.origin(ipc.identity("executor-0-42")) == ("executor-0-42", True)
    for forged in (b"executor-0-42", b"executor-0-42/main/" + b"0" * 32,
                   b"executor-0-42/evil/" + ipc.identity("executor-0-42").split(b"/")[2],
                   Trust(new_secret()).identity("executor-0-42"), b"\xff/main/x"):
        assert ipc.origin(forged) is None, forged


def test_each_connection_of_a_role_has_an_identity_of_its_own_that_proves_the_name():
    """A postprocess worker's credits socket made again gets a new identity (an executor
    that still holds the last one would refuse a duplicate), proving the same name; the
    connection number is under the tag, so it cannot be changed."""
    shared, own = new_secret(), new_secret()
    front, remote = Trust(shared, own), Trust(shared)
    first, second = (front.identity("postprocess-0-7", "credits", connection=n) for n in (1, 2))
    assert first != second != front.identity("postprocess-0-7", "credits")
    assert remote.name_of(first) == remote.name_of(second) == "postprocess-0-7"
    assert front.origin(front.identity("executor-0-42", connection=3)) == ("executor-0-42",
                                                                            True)
    name, role, tag = first.split(b"/")
    for forged in (b"/".join((name, b"credits.9", tag)), b"/".join((name, b"credits.", tag)),
                   b"/".join((name, b"credits.x", tag)), b"/".join((name, b"evil.1", tag))):
        assert remote.origin(forged) is None, forged


def test_refusals_are_counted_each_time_and_logged_once_per_peer_and_window():
    lines, now = [], [0.0]
    refusals = Refusals(lambda event, **fields: lines.append(fields), clock=lambda: now[0])
    for _ in range(100):
        refusals.refuse("10.0.0.9", "key refused")
    refusals.refuse("10.0.0.8", "key refused")
    now[0] = 11.0
    refusals.refuse("10.0.0.9", "key refused")
    assert refusals.count == 102
    assert [f["peer"] for f in lines] == ["10.0.0.9", "10.0.0.8", "10.0.0.9"]
