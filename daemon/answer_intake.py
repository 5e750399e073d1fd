"""A worker's answers, from the message to answered requests: the gate admits them (only
the worker holding a request, with its token, may answer it), the ledger lets them go, the
storage episode counts their masks, and `Answers` delivers them, a message at a time."""

from __future__ import annotations

from collections.abc import Callable

from pspnet.core import wire
from pspnet.core.status import Tally
from pspnet.daemon.answers import Answers
from pspnet.daemon.control_gate import ControlGate
from pspnet.daemon.ledger import Entry, Ledger
from pspnet.daemon.storage import StorageEpisode


class AnswerIntake:
    def __init__(self, gate: ControlGate, ledger: Ledger, storage: StorageEpisode,
                 answers: Answers, totals: Tally,
                 stamp: Callable[[str, Entry], tuple[bool, str, int]]) -> None:
        """`stamp`: Reloader.stamp (whether the sender is known, the version and classes
        of the model it serves)."""
        self.gate, self.ledger, self.storage = gate, ledger, storage
        self.deliver, self.totals, self.stamp = answers, totals, stamp

    def answers(self, results: tuple[wire.Result, ...], sender: str) -> None:
        """A worker's answers one by one: those the gate admits are answered, together."""
        admitted, duplicates, forged = self.gate.admit(results, sender, self.ledger.entries,
                                                       self.stamp)
        self.totals["duplicates_dropped"] += duplicates  # answered, or an earlier attempt's
        self.totals["forged_dropped"] += forged      # counted, dropped, never delivered
        for _, result, _ in admitted:
            self.ledger.answer(result.id)
            self.storage.saw(result)
        self.deliver.from_workers(admitted)

    def ok_answers(self, ok: wire.OkAnswers, sender: str) -> None:
        """A worker's ok answers in columns: admitted by the same rules as `answers`,
        answered together with no object per answer (issue 27)."""
        admitted, misfits, duplicates, forged = self.gate.admit_ok(
            ok, sender, self.ledger.entries, self.stamp)
        self.totals["duplicates_dropped"] += duplicates
        self.totals["forged_dropped"] += forged
        answer, masks = self.ledger.answer, ok.masks
        for _, entry, _ in admitted:
            answer(entry.request.id)
        self.storage.stored(sum(1 for i, _, _ in admitted if masks[i]))
        self.deliver.from_ok(ok, admitted)
        for entry, _, _ in misfits:
            answer(entry.request.id)
        self.deliver.from_workers(misfits)
