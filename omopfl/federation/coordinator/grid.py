"""A Grid for the coordinator's rounds: fast pulls over Flower's public calls, bytes counted, replies audited.

:class:`FastGrid` collects replies with the Grid's public ``push_messages``/``pull_messages`` in a tight
loop instead of ``send_and_receive``'s 3 s poll; it counts the bytes of every message sent and received
(Flower's protobuf serialisation of each content) and can record every reply as received for audit.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from omopfl.federation import codec
from omopfl.federation.flower_internals import content_bytes

__all__ = ["FastGrid"]


class FastGrid:
    """A Grid whose ``send_and_receive`` pulls replies in a tight loop (public push/pull calls).

    Flower's deployment grid sleeps 3 s between pulls; this one starts at ``poll`` seconds and backs
    off to at most ``max_poll``.  It also counts the bytes of every message sent and received and, if
    given a list, records every reply's content as received (:func:`codec.to_plain`: record names,
    keys, array shapes, metric values) for audit.  ``nodes`` restricts ``get_node_ids`` (the sites
    still taking part).
    """

    def __init__(self, grid: Grid, *, poll: float = 0.02, max_poll: float = 0.25,
                 audit: list[dict[str, Any]] | None = None) -> None:
        self._grid = grid
        self.poll = max(0.001, float(poll))
        self.max_poll = max(self.poll, float(max_poll))
        self.audit = audit
        self.nodes: list[int] | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.observer: Any = None  # the live run view (run_view.LiveState), told of nodes, sends and replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def get_node_ids(self) -> Iterable[int]:
        if self.nodes is not None:
            return list(self.nodes)
        nodes = list(self._grid.get_node_ids())
        if self.observer is not None:
            self.observer.nodes_seen(len(nodes))
        return nodes

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if not messages:
            return []
        types = {m.metadata.message_type for m in messages}
        self.bytes_sent += sum(content_bytes(m) for m in messages)
        pending = {i for i in self._grid.push_messages(messages) if i}
        replies: list[Message] = []
        started = time.monotonic()
        deadline = None if timeout is None else started + float(timeout)
        wait = self.poll
        observer = self.observer
        if observer is not None:
            observer.exchange_started(types, [m.metadata.dst_node_id for m in messages], timeout)
        while pending:
            got = list(self._grid.pull_messages(list(pending)))
            replies.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            if observer is not None:
                for reply in got:
                    observer.reply(reply, time.monotonic() - started)
                observer.waiting(time.monotonic() - started)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(wait if deadline is None else max(0.0, min(wait, deadline - time.monotonic())))
            wait = wait if got else min(self.max_poll, wait * 1.5)
        self.bytes_received += sum(content_bytes(m) for m in replies)
        if self.audit is not None:
            for reply in replies:
                self.audit.append(codec.audit_entry(reply, "/".join(sorted(types))))
        return replies
