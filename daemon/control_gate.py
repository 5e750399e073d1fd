"""The gate of the front's control port: who may speak there, and which answers count.

The front calls it at one point per message (`Front.read`) and where it hands out work:

- with `--transport tcp` the port speaks CurveZMQ and admits only the worker key (ZAP,
  core.keys); the tokens' secret is derived from that key, so that workers on other hosts
  verify them too, and the front's own workers prove their identities with a second secret
  only they hold (core.trust); with ipc the 0700 run directory keeps others out and the
  secret is random;
- a message counts only under an identity one of those secrets made, and on ipc only from
  the pid the kernel reports for its connection;
- an answer counts only with its request's token, from a worker the ledger says holds it.

What fails raises `Forged`: the front counts it and drops it, never delivers it.
"""

from __future__ import annotations

import dataclasses
import hmac
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import zmq

from pspnet.core import wire
from pspnet.core.config import PipelineConfig
from pspnet.core.keys import (
    WORKERS,
    HandshakeLog,
    KeyAuthenticator,
    Keys,
    serve_curve,
    start_authenticator,
)
from pspnet.core.trust import Refusals, Trust, new_secret, peer_pid
from pspnet.daemon.ledger import Entry

NAME = re.compile(r"^(preprocess|executor|postprocess)-(\d{1,4})-(\d{1,10})$")
PROVEN_KEPT = 1024              # identities whose tag was verified, remembered


class Forged(Exception):
    """A message the front did not hand out the right to send (core.trust)."""


class ControlGate:
    def __init__(self, cfg: PipelineConfig, log: Any) -> None:
        self.cfg = cfg
        self.refusals = Refusals(log.warning)
        self.trust = Trust(new_secret())
        self.curve: dict[str, str] | None = None     # the workers' keys, for their start
        self._auth: KeyAuthenticator | None = None
        self._handshakes: HandshakeLog | None = None
        # identity -> (who, whether the front started it, whether it is the "main" socket)
        self._proven: dict[bytes, tuple[wire.WorkerId, bool, bool]] = {}
        # a remote worker's main socket: the identity it proved (made with the worker key,
        # not the front's own secret), which is the one the front must send to
        self._remote_main: dict[str, bytes] = {}
        # whether a name is that of a worker the front started (the supervisor's children;
        # the front sets it once it has one): no remote worker may speak under it
        self.ours: Callable[[wire.WorkerId], bool] = lambda wid: False

    # ---- the socket ------------------------------------------------------------------

    def secure(self, ctx: zmq.Context, control: zmq.Socket) -> None:
        """Before `control` binds. Raises KeysError or OSError for unreadable --keys."""
        if self.cfg.transport != "tcp":
            return
        keys = Keys.for_daemon(self.cfg.keys_dir) if self.cfg.keys_dir else Keys.fresh()
        serve_curve(control, keys.server_public, keys.server_secret or b"", WORKERS)
        self._auth = start_authenticator(ctx, self.refusals, {WORKERS: keys.worker_public})
        self.trust = Trust(keys.token_secret(), new_secret())
        self.curve = keys.for_children()

    def listening(self, control: zmq.Socket) -> None:
        """Once bound: handshakes it refuses are logged (peers without CURVE)."""
        if self._auth is not None:
            self._handshakes = HandshakeLog(control, self.refusals)

    def close(self) -> None:
        """The handshake log and the ZAP thread end before the socket they watch."""
        if self._handshakes is not None:
            self._handshakes.stop()
            self._handshakes = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    # ---- what is handed out ------------------------------------------------------------

    def route(self, worker: str) -> bytes:
        """The identity the front sends to worker `worker` under: the one its main socket
        proved, for a remote worker; the one the front's own secret makes, for its own."""
        return self._remote_main.get(worker) or self.trust.identity(worker)

    def forget(self, worker: str) -> None:
        """A worker is gone (its name is never reused: it holds its pid)."""
        self._remote_main.pop(worker, None)

    def tokens(self, requests: Iterable[wire.Request], executor: str) -> tuple[str, ...]:
        """The requests' tokens as dispatched for `executor` (the wire carries them beside
        the requests: `wire.Dispatch.tokens`)."""
        token = self.trust.token
        return tuple(token(r.id, r.attempt, executor) for r in requests)

    # ---- what comes in -----------------------------------------------------------------

    def sender(self, identity: zmq.Frame, frames: list[zmq.Frame]) -> tuple[wire.WorkerId, bool]:
        """(the worker a message comes from, whether the front started it). A remote
        worker (tcp, the worker key) may not speak under the name of one of the front's
        own: it would be heard as that worker (its notes, answers, a "stuck" beat that
        stops it, a new address for its pixels)."""
        key = identity.bytes
        proven = self._proven.get(key)
        if proven is None:          # one HMAC and one parse per identity, not per message
            origin = self.trust.origin(key)
            if origin is None or NAME.match(origin[0]) is None:
                raise Forged("an identity the front did not hand out")
            proven = (wire.WorkerId.parse(origin[0]), origin[1], key.split(b"/")[1] == b"main")
            if len(self._proven) >= PROVEN_KEPT:
                self._proven.clear()
            self._proven[key] = proven
        wid, own, main = proven
        if not own:
            if self.ours(wid):
                raise Forged(f"a remote worker speaking as {wid.text}, one of the front's own")
            if main:
                if len(self._remote_main) >= PROVEN_KEPT and wid.text not in self._remote_main:
                    self._remote_main.clear()       # each is heard again at its next beat
                self._remote_main[wid.text] = key
        pid = peer_pid(frames[0]) if frames and self.cfg.transport == "ipc" else None
        if pid is not None and pid != wid.pid:
            raise Forged(f"{wid.text} speaking from pid {pid}")
        return wid, own

    def check_answer(self, result: wire.Result, sender: str, attempt: int,
                     executor: str | None, holders: tuple[str, ...], known: bool,
                     handed_out: str = "") -> None:
        """An answer to the current attempt: its token, and a sender that holds it (or, a
        postprocess worker the front knows (`known`): the executor's note that handed it
        the request may still be on its way). `handed_out`: the token this attempt was
        dispatched with, compared as it is (else made again: Trust.answers)."""
        why = self.forgery(result.id, result.attempt, result.token, sender, attempt,
                           executor, holders, known, handed_out)
        if why is not None:
            raise Forged(why)

    def forgery(self, rid: str, answered: int, token: str, sender: str, attempt: int,
                executor: str | None, holders: tuple[str, ...], known: bool,
                handed_out: str = "") -> str | None:
        """`check_answer` on an answer's fields (`answered`: its attempt): why it is
        forged, or None. The columns of a Results are checked with it, one call each."""
        if handed_out and executor is not None and answered == attempt:
            if not hmac.compare_digest(token, handed_out):
                return f"an answer to {rid} without its token"
        elif executor is None or answered != attempt or not hmac.compare_digest(
                token, self.trust.token(rid, attempt, executor)):     # Trust.answers
            return f"an answer to {rid} without its token"
        if sender not in holders and not (sender.startswith("postprocess-") and known):
            return f"{sender} answers {rid}, held by {holders}"
        return None

    def admit(self, results: Sequence[wire.Result], sender: str, entries: Mapping[str, Entry],
              stamp: Callable[[str, Entry], tuple[bool, str, int]],
              ) -> tuple[list[tuple[Entry, wire.Result, str]], int, int]:
        """A worker's answers, each checked alone (a forged one is dropped, not the rest):
        (those the front may deliver, as (entry, answer, model version)), how many answer
        no pending attempt (answered already, an earlier attempt's, twice in one message),
        how many are forged). `stamp(sender, entry)`: Reloader.stamp (whether the sender
        is known, the model's version and classes), asked once per executor."""
        admitted: list[tuple[Entry, wire.Result, str]] = []
        stamps: dict[str | None, tuple[bool, str, int]] = {}
        seen: set[str] = set()
        duplicates = forged = 0
        for result in results:
            pending = _pending(result.id, result.attempt, entries, seen, stamps, stamp, sender)
            if pending is None:
                duplicates += 1
                continue
            entry, (known, model, classes) = pending
            checked = self.admitted(result, sender, entry, known, (4, classes))
            if checked is None:
                forged += 1
                continue
            seen.add(result.id)
            admitted.append((entry, checked, model))
        return admitted, duplicates, forged

    def admit_ok(self, ok: wire.OkAnswers, sender: str, entries: Mapping[str, Entry],
                 stamp: Callable[[str, Entry], tuple[bool, str, int]],
                 ) -> tuple[list[tuple[int, Entry, str]], list[tuple[Entry, wire.Result, str]],
                            int, int]:
        """`admit` for a message's ok answers in columns (issue 27): the same rules, per
        answer only the ledger's (its entry, attempt, token and holder), no object made
        for it. Returns (those the front may deliver as (index, entry, model version)),
        (those whose areas do not fit their model: error answers, as `admit` gives
        them), how many answer no pending attempt, how many are forged."""
        admitted: list[tuple[int, Entry, str]] = []
        misfits: list[tuple[Entry, wire.Result, str]] = []
        stamps: dict[str | None, tuple[bool, str, int]] = {}
        seen: set[str] = set()
        duplicates = forged = 0
        attempts, tokens, rows = ok.attempts, ok.tokens, ok.rows
        width = -1 if ok.areas is None else ok.areas.shape[-1]
        forgery, compare_digest = self.forgery, hmac.compare_digest
        for i, rid in enumerate(ok.ids):
            pending = _pending(rid, attempts[i], entries, seen, stamps, stamp, sender)
            if pending is None:
                duplicates += 1
                continue
            entry, (known, model, classes) = pending
            request = entry.request
            if not (attempts[i] == request.attempt and entry.token   # the common case,
                    and entry.executor is not None and sender in entry.holders   # inline
                    and compare_digest(tokens[i], entry.token)):
                why = forgery(rid, attempts[i], tokens[i], sender, request.attempt,
                              entry.executor, entry.holders, known, entry.token)
            else:
                why = None
            if why is not None:
                self.refusals.refuse(sender, why)
                forged += 1
                continue
            seen.add(rid)
            if rows[i] >= 0 and width != classes:
                misfits.append((entry, wire.Result(
                    rid, attempts[i], wire.ERROR, ok.paths[i], stage=ok.stages[i],
                    error=f"areas (4, {width}), the model has {classes} classes",
                    token=tokens[i]), model))
                continue
            admitted.append((i, entry, model))
        return admitted, misfits, duplicates, forged

    def admitted(self, result: wire.Result, sender: str, entry: Entry, known: bool,
                 areas_shape: tuple[int, ...]) -> wire.Result | None:
        """The answer as the front may deliver it, or None for a forged one (`check_answer`;
        refused: logged at most once per peer and reason). Areas that do not fit the
        model's classes (`areas_shape`) make it an error answer, checked before anything
        adds them: the request is answered, never lost."""
        try:
            self.check_answer(result, sender, entry.request.attempt, entry.executor,
                              entry.holders, known, entry.token)
        except Forged as exc:
            self.refusals.refuse(sender, str(exc))
            return None
        if result.areas is not None and result.areas.shape != areas_shape:
            return dataclasses.replace(result, status=wire.ERROR, areas=None,
                                       error=f"areas {result.areas.shape}, the model has "
                                             f"{areas_shape[-1]} classes")
        return result

    def refused(self, identity: zmq.Frame, why: Forged) -> None:
        self.refusals.refuse(identity.bytes[:40].decode("ascii", "replace"), str(why))


def _pending(rid: str, attempt: int, entries: Mapping[str, Entry], seen: set[str],
             stamps: dict[str | None, tuple[bool, str, int]],
             stamp: Callable[[str, Entry], tuple[bool, str, int]], sender: str,
             ) -> tuple[Entry, tuple[bool, str, int]] | None:
    """The entry an answer is about and its executor's stamp (asked once per executor per
    message), or None when it answers no pending attempt (answered already, an earlier
    attempt's, twice in one message)."""
    entry = entries.get(rid)
    if entry is None or attempt < entry.request.attempt or rid in seen:
        return None
    stamped = stamps.get(entry.executor)
    if stamped is None:
        stamped = stamps[entry.executor] = stamp(sender, entry)
    return entry, stamped
