"""The door's bound on uploads: how many bytes of encoded images each client has accepted
and not yet answered, and all clients together.

Why: an upload's bytes stay in the daemon until its answer (a retry after a worker's
death dispatches them again), so without a bound one client sending fast could fill the
front's memory. A client at its share is told `busy` for the uploads that do not fit (it
waits and sends them again, as for --max-queue); an upload that could never fit is an
error. Pure bookkeeping: the door asks `admit`, and `release`s as answers leave.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pspnet.core.uploads import upload_refusal

BUSY = "busy"


@dataclass
class UploadBudget:
    per_client: int                     # --max-upload-inflight
    max_upload: int                     # --max-upload-bytes
    total: int = 0                      # all clients' bytes held now
    by_client: dict[bytes, int] = field(default_factory=dict)
    held: dict[tuple[bytes, str], int] = field(default_factory=dict)

    @property
    def limit(self) -> int:
        """All clients together: four clients' shares (the memory one daemon gives
        uploads, whatever the number of clients)."""
        return 4 * self.per_client

    def admit(self, client: bytes, client_id: str, nbytes: int) -> str | None:
        """None: counted (hold it until `release`); BUSY: not now; else why never."""
        too_large = upload_refusal(nbytes, self.max_upload)
        if too_large is not None:
            return too_large
        if nbytes > self.per_client:
            return (f"upload of {nbytes} bytes is over the daemon's --max-upload-inflight "
                    f"{self.per_client}")
        mine = self.by_client.get(client, 0)
        if mine + nbytes > self.per_client or self.total + nbytes > self.limit:
            return BUSY
        self.by_client[client] = mine + nbytes
        self.total += nbytes
        self.held[(client, client_id)] = nbytes
        return None

    def release(self, client: bytes, client_id: str) -> None:
        """That upload was answered (or cancelled): its bytes no longer count."""
        nbytes = self.held.pop((client, client_id), None)
        if nbytes is None:
            return
        self.total -= nbytes
        left = self.by_client[client] - nbytes
        if left:
            self.by_client[client] = left
        else:
            del self.by_client[client]
