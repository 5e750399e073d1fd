"""`pspnet status` on a terminal: the status document as a short table a person reads at
a glance (ready, draining, plan, workers, queue, images/s, errors); JSON stays the form
for scripts (`--json`, or whenever stdout is not a terminal)."""

from __future__ import annotations

from pspnet.core.status import Status


def status_table(status: Status) -> str:
    """A few aligned lines: the daemon's state, then one row per stage."""
    front, daemon = status.front, status.daemon
    why_not = status.readiness()
    rows = [("ready", "yes" if status.ready and why_not is None else f"no ({why_not})")]
    if daemon is not None:
        rows.append(("daemon", f"pid {daemon.pid} at {daemon.endpoint}"
                     + (" (draining)" if daemon.stopping else "")
                     + (f", watching {daemon.watch}" if daemon.watch else "")))
    plan = status.plan or {}
    if plan:
        rows.append(("plan", f"{plan.get('backend')} {plan.get('precision') or ''} on "
                     f"{','.join(plan.get('devices') or ())}"
                     + (f" ({plan['choice']})" if plan.get("choice") else "")))
    model = status.model or {}
    if model:
        swap = model.get("reload")
        done, failed, refused = (model.get(k) or 0 for k in
                                 ("reloads", "failed_reloads", "refused_reloads"))
        rows.append(("model", f"{model.get('version')} ({model.get('dir')})"
                     + (f", reloading to {swap['to']}: {swap['state']}" if swap else "")
                     + (f"; reloads {done} done, {failed} failed, {refused} refused"
                        if done or failed or refused else "")))
    rows += [
        ("queue", f"{front.queued} queued, {front.inflight} in flight"),
        ("images/s", f"{status.images_per_s:g} (last 10 s)"),
        ("answered", f"{front.ok} ok, {front.errors} errors"
         + (f", {daemon.refused} refused" if daemon is not None else "")
         + (f", {front.retried} retried" if front.retried else "")),
    ]
    if status.metrics:
        rows.append(("mIoU", f"{status.metrics.get('mIoU', float('nan')):.2f} "
                     f"over {status.metrics.get('images', '?')} images"))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines.append("")
    lines.append(f"{'stage':<12}{'up':>7}{'queue':>7}{'done':>9}{'errors':>8}{'restarts':>10}")
    for stage, s in status.stages.items():
        lines.append(f"{stage:<12}{f'{s.up}/{s.processes}':>7}{s.queue:>7}{s.processed:>9}"
                     f"{s.errors:>8}{s.restarts:>10}")
    for worker in status.remote:
        lines.append(f"{worker.stage + ' @' + str(worker.pid):<12}{'remote':>7}"
                     f"{worker.queue:>7}{worker.processed:>9}{worker.errors:>8}{'':>10}")
    return "\n".join(lines)
