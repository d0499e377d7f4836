"""The AUTOMATIC1111 prompt grammar: extra-network tags, AND, prompt editing/alternation, attention.

Order of processing (as A1111): `<kind:args>` tags are pulled out of the prompt, the rest is split on `AND`
(each part may end in `:weight`), each part gets a schedule of plain texts per step range
(`[from:to:when]`, `[a|b]`), and each scheduled text is read into `(text, weight)` fragments by
`parse_attention` when it is encoded. Nothing here raises on malformed text: it is read the way A1111
reads it, including A1111's fallback to the unchanged prompt where its grammar cannot parse it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

ROUND_MULTIPLIER = 1.1  # "(x)" scales attention by this; "[x]" by its inverse
BREAK_WEIGHT = -1.0  # weight of the pseudo-fragment "BREAK" (start a new 75-token chunk)


# ---------------------------------------------------------------------------------------------------------------
# Extra-network tags: <lora:name:0.7:unet=0.5>

_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class ExtraNetworkTag:
    """One `<kind:arg:arg:key=value>` tag; `key=value` args are named, every other arg positional."""

    kind: str
    positional: list[str]
    named: dict[str, str]


def _tag_from_args(kind: str, args: str) -> ExtraNetworkTag:
    """Split a tag's `:`-separated args as A1111 does (an arg with exactly one `=` is named)."""
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in args.split(":"):
        parts = item.split("=", 2)
        if len(parts) == 2:
            named[parts[0]] = parts[1]
        else:
            positional.append(item)
    return ExtraNetworkTag(kind, positional, named)


def extract_extra_networks(prompt: str) -> tuple[str, list[ExtraNetworkTag]]:
    """Remove every `<kind:args>` tag from the prompt; returns the remaining text (not tidied) and the tags in order."""
    tags: list[ExtraNetworkTag] = []

    def take(match: re.Match[str]) -> str:
        tags.append(_tag_from_args(match.group(1), match.group(2)))
        return ""

    return _EXTRA_NETWORK.sub(take, prompt), tags


# ---------------------------------------------------------------------------------------------------------------
# AND (composable diffusion)

_AND = re.compile(r"\bAND\b")
_PART_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Split on the word `AND`; each part's trailing `:w` becomes its weight (default 1.0, negatives allowed)."""
    parts = []
    for sub in _AND.split(prompt):
        match = _PART_WEIGHT.match(sub)
        text, weight = match.groups()  # the pattern matches any string
        parts.append((text, float(weight) if weight is not None else 1.0))
    return parts


# ---------------------------------------------------------------------------------------------------------------
# Attention: (x) [x] (x:1.5) \( BREAK

_ATTENTION_TOKEN = re.compile(
    r"""(?P<escaped>\\[()\[\]\\]) | (?P<backslash>\\) | (?P<open>[(\[])
      | :\s*(?P<weight>[+-]?[.\d]+)\s*\) | (?P<close>[)\]]) | (?P<text>[^\\()\[\]:]+) | (?P<colon>:)""",
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def _float_or_none(text: str) -> float | None:
    """`float(text)`, or None where it is not a number (A1111 raises there, e.g. on `(x:1.2.3)`)."""
    try:
        return float(text)
    except ValueError:
        return None


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Read emphasis into `(text, weight)` fragments as A1111 `parse_prompt_attention`; BREAK gives ("BREAK", -1)."""
    fragments: list[list] = []  # [text, weight], mutable while brackets close
    round_opens: list[int] = []
    square_opens: list[int] = []

    def scale_from(start: int, multiplier: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= multiplier

    def add_text(chunk: str) -> None:
        for i, piece in enumerate(_BREAK.split(chunk)):
            if i > 0:
                fragments.append(["BREAK", BREAK_WEIGHT])
            fragments.append([piece, 1.0])

    for match in _ATTENTION_TOKEN.finditer(text):
        kind, token = match.lastgroup, match.group(0)
        if kind == "escaped":
            fragments.append([token[1], 1.0])
        elif kind == "backslash":  # a lone backslash vanishes (A1111 keeps token[1:] == "")
            fragments.append(["", 1.0])
        elif kind == "open":
            (round_opens if token == "(" else square_opens).append(len(fragments))
        elif kind == "weight" and round_opens and _float_or_none(match.group("weight")) is not None:
            scale_from(round_opens.pop(), float(match.group("weight")))
        elif token == ")" and round_opens:
            scale_from(round_opens.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_opens:
            scale_from(square_opens.pop(), 1 / ROUND_MULTIPLIER)
        else:  # plain text, a stray closer or colon, or a weight with no "(" open
            add_text(token)

    # Brackets still open at the end apply to everything after them: all "(" first, then all "[".
    for start in round_opens:
        scale_from(start, ROUND_MULTIPLIER)
    for start in square_opens:
        scale_from(start, 1 / ROUND_MULTIPLIER)

    merged: list[list] = []
    for fragment in fragments or [["", 1.0]]:
        if merged and merged[-1][1] == fragment[1]:  # runs of exactly equal weight join
            merged[-1][0] += fragment[0]
        else:
            merged.append(fragment)
    return [(t, w) for t, w in merged]


# ---------------------------------------------------------------------------------------------------------------
# Prompt editing and alternation: [from:to:when] [to:when] [from::when] [a|b|c]
#
# A1111 reads these with a lark grammar in which any of `[ ] ( ) :` may also stand as plain text at the top level,
# while inside a bracket construct everything must nest properly: `(` prompt [":" prompt] `)`, `[` prompt `]`,
# `[` [prompt ":"] prompt ":" NUMBER `]` and `[` prompt ("|" prompt?)+ `]`. The parse fails, and the whole prompt
# is used unchanged for every step, where a `|` is left outside any alternation or a backslash ends the text or a
# line. A construct's reading does not depend on what surrounds it, so one left-to-right pass with a stack decides
# each opener: it is a construct if one closes properly from there, else a literal character.

_SCHEDULE_TOKEN = re.compile(r"(?P<plain>(?:[^\\\[\]():|]|\\.)+)|(?P<special>[\[\]():|])|(?P<bad>\\)")
_WHEN = re.compile(r"\s*([+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+))\s*")


@dataclass
class _Edit:
    """`[before:after:when]`; before is None for `[after:when]`; when is the number exactly as written."""

    before: list | None
    after: list
    when: str


@dataclass
class _Alternation:
    """`[a|b|c]`: option (step - 1) % len(options) is used at each step."""

    options: list[list]


@dataclass
class _Frame:
    """A bracket construct being read: segments of items between its `:` / `|` separators."""

    opener: str
    segments: list[list] = field(default_factory=lambda: [[]])
    separators: list[str] = field(default_factory=list)

    def literal_items(self) -> list:
        """The frame read as plain characters (what A1111 falls back to when the construct is invalid)."""
        items: list = [self.opener]
        for i, segment in enumerate(self.segments):
            if i > 0:
                items.append(self.separators[i - 1])
            items.extend(segment)
        return items


def _close_frame(frame: _Frame, closer: str) -> list | None:
    """The items a frame stands for when `closer` ends it, or None when it is not a valid construct."""
    separators = set(frame.separators)
    if closer == ")" and frame.opener == "(" and separators <= {":"} and len(frame.separators) <= 1:
        return frame.literal_items() + [")"]
    if closer != "]" or frame.opener != "[":
        return None
    if not separators:
        return frame.literal_items() + ["]"]
    if separators == {"|"}:
        return [_Alternation(frame.segments)]
    if separators == {":"} and len(frame.separators) <= 2:
        last = frame.segments[-1]
        when = _WHEN.fullmatch(last[0]) if len(last) == 1 and isinstance(last[0], str) else None
        if when is None:
            return None
        before = frame.segments[0] if len(frame.segments) == 3 else None
        return [_Edit(before, frame.segments[-2], when.group(1))]
    return None


def _parse_schedule_tree(prompt: str) -> list | None:
    """Read prompt editing/alternation into a list of str, _Edit and _Alternation items; None where A1111 fails."""
    top: list = []
    stack: list[_Frame] = []

    def items() -> list:
        return stack[-1].segments[-1] if stack else top

    def fail_open_frames() -> bool:
        """Turn every open frame into literal text; False if that leaves a `|` outside any alternation."""
        for frame in stack:
            if "|" in frame.separators:
                return False
            top.extend(frame.literal_items())
        stack.clear()
        return True

    for match in _SCHEDULE_TOKEN.finditer(prompt):
        token = match.group(0)
        if match.lastgroup == "bad":  # backslash at the end of the text or of a line
            return None
        if match.lastgroup == "plain":
            items().append(token)
        elif token in "([":
            stack.append(_Frame(token))
        elif not stack:  # ] ) : are literal at the top level; | cannot be
            if token == "|":
                return None
            top.append(token)
        elif token in ":|":
            stack[-1].separators.append(token)
            stack[-1].segments.append([])
        else:
            closed = _close_frame(stack[-1], token)
            if closed is not None:
                stack.pop()
                items().extend(closed)
            else:
                if not fail_open_frames():
                    return None
                top.append(token)
    if not fail_open_frames():
        return None
    return top


def _when_step(number: str, steps: int, int_offset: int, float_offset: float, old: bool) -> float:
    """The step a `when` number means (A1111 rules); only results >= 1 become schedule boundaries."""
    value = float(number)
    if old:
        value = value * steps if value < 1 else value
    elif "." in number:
        value = (value - float_offset) * steps
    else:
        value = value - int_offset
    if value >= steps:
        return steps
    return int(value) if math.isfinite(value) else value  # -inf (A1111 would crash) behaves like any value < 1


def _walk(items: list):
    """Every _Edit and _Alternation in the tree, without recursion."""
    pending = [items]
    while pending:
        for item in pending.pop():
            if isinstance(item, _Edit):
                pending.extend([item.after] + ([item.before] if item.before is not None else []))
                yield item
            elif isinstance(item, _Alternation):
                pending.extend(item.options)
                yield item


def _render(items: list, step: int, when_of: dict[int, float]) -> str:
    """The plain text the tree stands for at one step."""
    out: list[str] = []
    pending = [iter(items)]
    while pending:
        item = next(pending[-1], None)
        if item is None:
            pending.pop()
        elif isinstance(item, str):
            out.append(item)
        elif isinstance(item, _Edit):
            chosen = (item.before or []) if step <= when_of[id(item)] else item.after
            pending.append(iter(chosen))
        else:
            pending.append(iter(item.options[(step - 1) % len(item.options)]))
    return "".join(out)


def prompt_schedule(
    prompt: str, steps: int, hires_steps: int | None = None, use_old_scheduling: bool = False
) -> list[tuple[int, str]]:
    """[(end_at_step, text), ...] for one AND-part; with hires_steps, the schedule of the hires pass (its steps)."""
    if hires_steps is None or use_old_scheduling:
        int_offset, float_offset, total = 0, 0.0, steps
    else:  # hires pass: "1.5" or step numbers beyond the first pass address it
        int_offset, float_offset, total = steps, 1.0, hires_steps

    tree = _parse_schedule_tree(prompt)
    if tree is None:
        return [(total, prompt)]

    boundaries = {total}
    when_of: dict[int, float] = {}
    for node in _walk(tree):
        if isinstance(node, _Edit):
            when = _when_step(node.when, total, int_offset, float_offset, use_old_scheduling)
            when_of[id(node)] = when
            if when >= 1:
                boundaries.add(int(when))
        else:
            boundaries.update(range(1, total + 1))
    return [(t, _render(tree, t, when_of)) for t in sorted(boundaries)]


def text_at_step(schedule: list[tuple[int, str]], step: int) -> str:
    """Text for sampler step `step` (0-based counter): first entry with step <= end; past the end, the first (A1111)."""
    for end_at_step, text in schedule:
        if step <= end_at_step:
            return text
    return schedule[0][1]


# ---------------------------------------------------------------------------------------------------------------
# One prompt, ready for a job


@dataclass(frozen=True)
class PromptPart:
    """One AND-part: its text (weight suffix removed), weight and schedule of texts per step range."""

    text: str
    weight: float
    schedule: list[tuple[int, str]]


@dataclass
class ParsedPrompt:
    """A prompt read once for a job: composable parts, each with its schedule."""

    parts: list[PromptPart]

    def at_step(self, step: int) -> list[tuple[str, float]]:
        """(text, weight) of every part at sampler step `step` (0-based counter)."""
        return [(text_at_step(part.schedule, step), part.weight) for part in self.parts]

    def texts(self) -> set[str]:
        """Every distinct text any part uses at some step (what needs encoding)."""
        return {text for part in self.parts for _, text in part.schedule}


def parse_prompt(
    prompt: str,
    steps: int,
    hires_steps: int | None = None,
    use_old_scheduling: bool = False,
    split_on_and: bool = True,
) -> ParsedPrompt:
    """AND-split (positive prompts; A1111 never splits negatives: split_on_and=False) and schedule each part once."""
    pieces = split_and(prompt) if split_on_and else [(prompt, 1.0)]
    schedules: dict[str, list[tuple[int, str]]] = {}
    parts = []
    for text, weight in pieces:
        if text not in schedules:
            schedules[text] = prompt_schedule(text, steps, hires_steps, use_old_scheduling)
        parts.append(PromptPart(text, weight, schedules[text]))
    return ParsedPrompt(parts)
