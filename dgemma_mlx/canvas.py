"""How one canvas looks: a readable piece per token and a style per position.

:class:`TokenPieces` turns token ids into short readable text (``▁`` → space, newline → ``↵``,
special tokens compact, byte-fallback tokens as bytes); :func:`canvas_text` styles a pass's canvas:
pinned positions (infilling's fixed text) dim, accepted positions bold green, noisy ones coloured by their entropy (:func:`noise_style`), tokens
that changed since the previous pass underlined.
"""

from __future__ import annotations

from typing import Optional

from rich.color import Color
from rich.style import Style
from rich.text import Text

from .events import PassEvent

__all__ = [
    "ACCEPTED_STYLE", "CHANGED_STYLE", "PINNED_STYLE", "SPECIAL_STYLE", "TokenPieces", "canvas_text", "noise_style",
    "terminal_safe",
]

ACCEPTED_STYLE = Style(bold=True, color="green")
"""Canvas positions whose token was accepted in this pass."""
PINNED_STYLE = Style(color="bright_white", dim=True)
"""Canvas positions pinned by the caller (infilling's fixed text): never change."""
CHANGED_STYLE = Style(underline=True)
"""Added to canvas positions whose token differs from the previous pass of the same block."""
SPECIAL_STYLE = Style(italic=True)
"""Added to special tokens (shown compactly, e.g. ``⟨channel``)."""

_LOW = (110, 110, 150)  # noisy position with entropy 0: muted blue-grey
_HIGH = (215, 75, 75)  # noisy position with entropy >= _ENTROPY_SCALE: red
_ENTROPY_SCALE = 6.0  # nats
_NOISE_STYLES = [
    Style(color=Color.from_rgb(*(lo + (hi - lo) * k / 7 for lo, hi in zip(_LOW, _HIGH)))) for k in range(8)
]


def noise_style(entropy: float) -> Style:
    """Style of a position that is still noisy: coloured from blue-grey (sure) to red (unsure)."""
    k = int(max(0.0, min(1.0, entropy / _ENTROPY_SCALE)) * 7 + 0.5)
    return _NOISE_STYLES[k]


def _visible(s: str) -> str:
    """Make whitespace/control characters visible on one line: newline → ↵, tab → ⇥."""
    out = []
    for ch in s:
        if ch == "\n":
            out.append("↵")
        elif ch == "\t":
            out.append("⇥")
        elif ch == "\r":
            out.append("␍")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


_CONTROL_PICTURES = {c: chr(0x2400 + c) for c in range(32) if c not in (9, 10)}  # ␀ … ␟ (ESC → ␛)
_CONTROL_PICTURES[127] = "\u2421"  # ␡
_CONTROL_PICTURES.update({c: "\ufffd" for c in range(0x80, 0xA0)})  # C1 controls (CSI, OSC, …) → �


def terminal_safe(s: str) -> str:
    """Text a model wrote, made safe to print on a terminal: control characters other than newline
    and tab become visible symbols (ESC → ``␛``, DEL → ``␡``, C1 controls → ``�``), so model output
    can never move the cursor, clear the screen or retitle the window. Piped output stays raw."""
    return s.translate(_CONTROL_PICTURES)


def _compact_special(token: str) -> str:
    """``<|channel>`` → ``⟨channel``, ``<channel|>`` → ``channel⟩``, ``<pad>`` → ``⟨pad⟩``."""
    name = token[1:-1] if token.startswith("<") and token.endswith(">") else token
    opens, closes = name.startswith("|"), name.endswith("|")
    name = name.strip("|")
    if opens and not closes:
        return "⟨" + name
    if closes and not opens:
        return name + "⟩"
    return "⟨" + name + "⟩"


class TokenPieces:
    """Readable text of single token ids, cached per id.

    ``piece(id)`` maps "▁" to a space, a newline to "↵", special tokens to a compact form
    (``⟨channel``); ``byte(id)`` is the byte value of a ``<0xNN>`` byte-fallback token, else None.
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bool, Optional[int]]] = {}
        special: set[int] = set()
        try:
            special.update(i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False))
        except Exception:
            pass
        try:
            special.update(tokenizer.all_special_ids)
        except Exception:
            pass
        self.special_ids = frozenset(special)

    def _lookup(self, token_id: int) -> tuple[str, bool, Optional[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            try:
                token = self._tokenizer.convert_ids_to_tokens(token_id)
            except Exception:
                token = None
            if token is None:
                hit = (f"⟨?{token_id}⟩", True, None)
            elif token_id in self.special_ids:
                hit = (_compact_special(token), True, None)
            elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                try:
                    b = int(token[3:5], 16)
                    hit = (_visible(chr(b)) if b < 0x80 else f"‹{b:02X}›", False, b)
                except ValueError:
                    hit = (_visible(token.replace("\u2581", " ")), False, None)
            else:
                hit = (_visible(token.replace("\u2581", " ")), False, None)
            self._cache[token_id] = hit
        return hit

    def piece(self, token_id: int) -> str:
        return self._lookup(token_id)[0]

    def is_special(self, token_id: int) -> bool:
        return self._lookup(token_id)[1]

    def byte(self, token_id: int) -> Optional[int]:
        return self._lookup(token_id)[2]


def _utf8_length(lead: int) -> int:
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def canvas_text(event: PassEvent, pieces: TokenPieces, previous: Optional[list[int]] = None) -> Text:
    """The canvas of one pass as styled text, one piece per position.

    Pinned positions get :data:`PINNED_STYLE`, accepted ones :data:`ACCEPTED_STYLE`, the others
    :func:`noise_style` of their entropy;
    positions whose token differs from ``previous`` (the previous pass's canvas) also get
    :data:`CHANGED_STYLE`. A run of byte tokens that forms a whole UTF-8 character is shown as that
    character (styled like its first position, marked changed if any byte changed); a stray
    non-ASCII byte is shown as ``‹NN›``.
    """
    canvas, accepted, entropy = event.canvas, event.accepted, event.entropy
    n = len(canvas)
    text = Text(no_wrap=False, overflow="fold")
    i = 0
    while i < n:
        tid = canvas[i]
        end = i + 1
        b = pieces.byte(tid)
        if b is not None and b >= 0x80:
            length = _utf8_length(b)
            if length > 1 and i + length <= n:
                tail = [pieces.byte(t) for t in canvas[i + 1 : i + length]]
                if all(x is not None and 0x80 <= x <= 0xBF for x in tail):
                    try:
                        display = _visible(bytes([b, *tail]).decode("utf-8"))
                        end = i + length
                    except UnicodeDecodeError:
                        display = pieces.piece(tid)
                else:
                    display = pieces.piece(tid)
            else:
                display = pieces.piece(tid)
        else:
            display = pieces.piece(tid)
        if event.pinned is not None and i < len(event.pinned) and event.pinned[i]:
            style = PINNED_STYLE
        elif i < len(accepted) and accepted[i]:
            style = ACCEPTED_STYLE
        else:
            style = noise_style(entropy[i] if i < len(entropy) else 0.0)
        if pieces.is_special(tid):
            style = style + SPECIAL_STYLE
        if previous is not None and len(previous) == n and previous[i:end] != canvas[i:end]:
            style = style + CHANGED_STYLE
        text.append(display, style)
        i = end
    return text
