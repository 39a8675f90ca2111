"""Multi-turn chat that never re-reads the conversation.

* :mod:`.session` — :class:`ChatSession`: the conversation, its prefix cache and the turn protocol.
* :mod:`.transcript` — the JSON transcripts ``/save`` writes and ``/load`` reads.
* :mod:`.stats` — what each turn cost (``/stats``).
* :mod:`.repl` — :class:`ChatRepl` / :func:`run_repl`, the interactive loop of ``dgemma chat``.
"""

from .repl import HELP, ChatRepl, default_history_file, parse_params, run_repl
from .session import ChatSession
from .stats import ChatStats, TurnStats, format_chat_stats
from .transcript import TRANSCRIPT_FORMAT, Transcript

__all__ = [
    "ChatSession",
    "ChatStats",
    "TurnStats",
    "TRANSCRIPT_FORMAT",
    "Transcript",
    "ChatRepl",
    "HELP",
    "run_repl",
    "parse_params",
    "format_chat_stats",
    "default_history_file",
]
