"""The A1111 prompt grammar. Expectations are derived by hand from A1111's rules (modules/prompt_parser.py,
modules/extra_networks.py); the comment on a row says how where it is not obvious. Sheet = shared a1111.md §1/§10."""
import time

import pytest

from sdstudio.prompt.parser import (
    ExtraNetworkTag,
    extract_extra_networks,
    parse_attention,
    parse_prompt,
    prompt_schedule,
    split_and,
    text_at_step,
)

DOWN = 1 / 1.1  # "[x]"


def alternating(*options: str, steps: int = 10) -> list[tuple[int, str]]:
    """Every step a boundary; option (step - 1) % n at each."""
    return [(t, options[(t - 1) % len(options)]) for t in range(1, steps + 1)]


# ---- attention ------------------------------------------------------------------------------------------------

ATTENTION = [
    # the sheet's examples 1-8, verbatim
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),  # equal weights merge
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        # one "(" before "house" never closes: x1.1 from there to the end, applied after every closed bracket
        [("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", DOWN * 1.1), (" a ", 1.1),
         ("hill", 0.5 * 1.1), (", sun, ", 1.1), ("sky", 1.1 * 1.1 * 1.1 * 1.1), (".", 1.1)],
    ),
    ("cat BREAK dog", [("cat", 1.0), ("BREAK", -1.0), ("dog", 1.0)]),  # whitespace around BREAK is eaten
    ("[a:b]", [("a:b", DOWN)]),
    # products, multiplied in closing order
    ("((x))", [("x", 1.1 * 1.1)]),
    ("(((x)))", [("x", 1.1 * 1.1 * 1.1)]),
    ("[x]", [("x", DOWN)]),
    ("[[x]]", [("x", DOWN * DOWN)]),
    ("(x:1.5)", [("x", 1.5)]),
    ("(x: 1.5 )", [("x", 1.5)]),  # spaces around the number allowed
    ("(x:-1)", [("x", -1.0)]),
    ("((a:1.5) b)", [("a", 1.5 * 1.1), (" b", 1.1)]),
    ("(a:b:1.5)", [("a:b", 1.5)]),  # the first ":" is text, ":1.5)" closes
    ("[a:1.5)", [("a:1.5)", DOWN)]),  # a weight needs an open "(": here it is text, "[" stays open
    ("([a)", [("a", 1.1 * DOWN)]),  # ")" closes "(", the "[" stays open to the end
    ("[(a]", [("a", 1.1 * DOWN)]),  # "]" closes "[" first (x1/1.1), then the open "(" applies at the end (x1.1)
    # escapes and strays
    ("a)b]", [("a)b]", 1.0)]),
    ("a:b", [("a:b", 1.0)]),
    ("\\\\x", [("\\x", 1.0)]),
    ("a\\b", [("ab", 1.0)]),  # a backslash before an ordinary character is dropped (A1111 keeps token[1:] == "")
    ("(\\))", [(")", 1.1)]),  # escaped characters are still scaled by enclosing brackets
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
    # BREAK
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # BREAK is scaled like text (then no chunk break)
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("aBREAKb break", [("aBREAKb break", 1.0)]),  # whole uppercase word only
    ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    # A1111 raises on an unreadable weight; we keep it as text and the "(" open
    ("(a:1.2.3)", [("a:1.2.3)", 1.1)]),
]


@pytest.mark.parametrize("text,expected", ATTENTION)
def test_parse_attention(text, expected):
    got = parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], abs=1e-12)


def test_attention_weights_are_exact_products():
    # A1111 compares float weights with == when merging; ours must be bit-equal products in the same order
    assert parse_attention("((x))")[0][1] == 1.1 * 1.1
    assert parse_attention("a (b)(c)") == [("a ", 1.0), ("bc", 1.1)]


# ---- prompt editing and alternation ---------------------------------------------------------------------------

SCHEDULES = [
    ("test", [(10, "test")]),
    # the sheet's examples (steps 10), verbatim
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    # more of A1111's own examples
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),  # emphasis inside an edit is kept as text
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),  # "[" stands as a literal character
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),  # junk is literal, the later edit still works
    ("[a|(b:1.1)]", alternating("a", "(b:1.1)")),
    ("[fe|]male", alternating("female", "male")),
    ("[fe|||]male", alternating("female", "male", "male", "male")),
    # [from::when], [to:when], nesting, empty parts
    ("a [b::3] c", [(3, "a b c"), (10, "a  c")]),
    ("[:b:4]", [(4, ""), (10, "b")]),
    ("[a||b]", alternating("a", "", "b")),
    ("[|]", alternating("", "")),
    ("[a|b] [x:5]", [(t, "ab"[(t - 1) % 2] + (" x" if t > 5 else " ")) for t in range(1, 11)]),
    # to = alternation, when 3: "" through step 3, then the alternation's option for the step
    ("[[a|b]:3]", [(t, "" if t <= 3 else "ab"[(t - 1) % 2]) for t in range(1, 11)]),
    ("(x [b:3]:1.2)", [(3, "(x :1.2)"), (10, "(x b:1.2)")]),  # an edit inside (x:w) emphasis
    ("[a:(x:1.2):4]", [(4, "a"), (10, "(x:1.2)")]),
    # when -> step: fraction if the number has ".", else absolute; min(steps, int(v)); only >= 1 are boundaries
    ("[a:b:0]", [(10, "b")]),  # when 0: "after" from the start
    ("[a:-2]", [(10, "a")]),
    ("[a:20]", [(10, "")]),  # capped at steps: "before" (nothing) throughout
    ("[a:b:1.0]", [(10, "a")]),  # "1.0" has "." -> 1.0 * 10 = 10
    ("[a:b:.05]", [(10, "b")]),  # int(0.5) = 0
    ("[a:b:3e1]", [(10, "a")]),  # SIGNED_NUMBER accepts exponents; no "." -> absolute 30 -> 10
    ("[a:b: 2 ]", [(2, "a"), (10, "b")]),  # whitespace around the number
    # not edits: the text stays as written
    ("[a:b:c:3]", [(10, "[a:b:c:3]")]),  # three colons
    ("[a:b:x]", [(10, "[a:b:x]")]),  # no number
    ("[a:1 2]", [(10, "[a:1 2]")]),
    ("a \\[b:3]", [(10, "a \\[b:3]")]),  # escaped opener
    ("[(a:3]:5]", [(10, "[(a:3]:5]")]),  # "(" never closes inside: the whole outer bracket is literal
    # lark parse failures: A1111 uses the whole prompt unchanged for every step
    ("a [b:3] | c", [(10, "a [b:3] | c")]),  # "|" outside an alternation
    ("(a|b) [c:3]", [(10, "(a|b) [c:3]")]),  # "|" directly inside parentheses
    ("[a|b:3] [c:3]", [(10, "[a|b:3] [c:3]")]),  # "|" and ":" in one bracket
    ("[c:3] x\\", [(10, "[c:3] x\\")]),  # backslash at the end
    ("a\\\n[b:3]", [(10, "a\\\n[b:3]")]),  # backslash before a newline
    ("a [{b|d{:.5] c", [(10, "a [{b|d{:.5] c")]),  # A1111's doctest expects an edit here, but its lark grammar fails
    ("a \\| [b:3]", [(3, "a \\| "), (10, "a \\| b")]),  # an escaped "|" is fine
]


@pytest.mark.parametrize("prompt,expected", SCHEDULES)
def test_prompt_schedule(prompt, expected):
    assert prompt_schedule(prompt, 10) == expected


def test_docstring_example_hundred_steps():
    # A1111's comment at the top of prompt_parser.py, steps=100
    prompt = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
              "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]")
    assert prompt_schedule(prompt, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


@pytest.mark.parametrize(
    "prompt,expected",
    [
        # hires pass of 10 after 10 base steps: fractions are offset by 1.0, absolute steps by the base steps
        ("a [b:.5] c", [(10, "a b c")]),  # (0.5 - 1) * 10 < 1: "after" throughout
        ("a [b:1.5] c", [(5, "a  c"), (10, "a b c")]),  # (1.5 - 1) * 10 = 5
        ("a [b:15] c", [(5, "a  c"), (10, "a b c")]),  # 15 - 10 = 5
        ("a [b:3] c", [(10, "a b c")]),  # 3 - 10 < 1
        ("[x|y]", alternating("x", "y")),  # alternation counts hires steps
    ],
)
def test_hires_schedule(prompt, expected):
    assert prompt_schedule(prompt, 10, hires_steps=10) == expected


def test_hires_schedule_uses_hires_step_count():
    assert prompt_schedule("a [b:1.5] c", 20, hires_steps=8) == [(4, "a  c"), (8, "a b c")]
    assert prompt_schedule("a | b", 20, hires_steps=8) == [(8, "a | b")]  # fallback uses the pass's steps


def test_old_scheduling():
    # old rule: v * steps if v < 1 else v; "1.0" is step 1, not the end
    assert prompt_schedule("[a:b:1.0]", 10, use_old_scheduling=True) == [(1, "a"), (10, "b")]
    assert prompt_schedule("[a:b:0.3]", 10, use_old_scheduling=True) == [(3, "a"), (10, "b")]
    # with old scheduling A1111 ignores the hires offsets and uses the base step count
    assert prompt_schedule("a [b:1.5] c", 10, hires_steps=10, use_old_scheduling=True) == [(1, "a  c"), (10, "a b c")]


def test_construct_followed_by_literal_closer_is_read_as_edit():
    # For "[a:3]]" A1111's lark resolves the ambiguity (edit + "]" vs all literal) differently per process
    # (PYTHONHASHSEED); we always read the edit.
    assert prompt_schedule("[a:3]]", 10) == [(3, "]"), (10, "a]")]


def test_text_at_step():
    schedule = [(3, "a"), (10, "b")]
    assert [text_at_step(schedule, s) for s in (0, 3, 4, 10)] == ["a", "a", "b", "b"]
    assert text_at_step(schedule, 11) == "a"  # past the last entry A1111 falls back to the first


# ---- AND ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "prompt,expected",
    [
        ("a AND b", [("a", 1.0), (" b", 1.0)]),  # trailing whitespace trimmed, leading kept
        ("a:1.5 AND b: -0.5", [("a", 1.5), (" b", -0.5)]),
        ("cat:2", [("cat", 2.0)]),  # a weight without any AND still counts
        ("a :.5 ", [("a", 0.5)]),
        ("a:5.", [("a", 5.0)]),
        ("a ANDb", [("a ANDb", 1.0)]),  # whole word only
        ("a and b", [("a and b", 1.0)]),  # case-sensitive
        ("(a:1.2)", [("(a:1.2)", 1.0)]),  # ends with ")": no weight
        ("a:", [("a:", 1.0)]),
        ("a:1e3", [("a:1e3", 1.0)]),  # no exponents in AND weights
        ("x AND", [("x", 1.0), ("", 1.0)]),
    ],
)
def test_split_and(prompt, expected):
    assert split_and(prompt) == expected


def test_parse_prompt_parts_and_steps():
    parsed = parse_prompt("a [b:c:5] AND d:0.5 AND d:0.5", 10)
    assert [(p.text, p.weight) for p in parsed.parts] == [("a [b:c:5]", 1.0), (" d", 0.5), (" d", 0.5)]
    assert parsed.parts[0].schedule == [(5, "a b"), (10, "a c")]
    assert parsed.parts[1].schedule is parsed.parts[2].schedule  # identical texts are scheduled once
    assert parsed.at_step(5) == [("a b", 1.0), (" d", 0.5), (" d", 0.5)]
    assert parsed.at_step(6)[0] == ("a c", 1.0)
    assert parsed.texts() == {"a b", "a c", " d"}


def test_parse_prompt_negative_is_not_split():
    parsed = parse_prompt("blurry AND ugly:2", 20, split_on_and=False)
    assert [(p.text, p.weight) for p in parsed.parts] == [("blurry AND ugly:2", 1.0)]


def test_parse_prompt_hires():
    parsed = parse_prompt("a [b:1.5] c", 10, hires_steps=10)
    assert parsed.parts[0].schedule == [(5, "a  c"), (10, "a b c")]


# ---- extra networks ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "prompt,text,tags",
    [
        ("a <lora:x:0.5> b", "a  b", [ExtraNetworkTag("lora", ["x", "0.5"], {})]),
        ("<lora:a:1:unet=0.3>", "", [ExtraNetworkTag("lora", ["a", "1"], {"unet": "0.3"})]),
        ("<lyco:b:0.8:te=0.2:dyn=8>x", "x", [ExtraNetworkTag("lyco", ["b", "0.8"], {"te": "0.2", "dyn": "8"})]),
        (
            "<lora:a:1>, cat, <hypernet:h:0.5>, (dog:1.2)",  # removed in place: the commas stay (A1111 does not tidy)
            ", cat, , (dog:1.2)",
            [ExtraNetworkTag("lora", ["a", "1"], {}), ExtraNetworkTag("hypernet", ["h", "0.5"], {})],
        ),
        ("<lora:x:te=0.5=1>", "", [ExtraNetworkTag("lora", ["x", "te=0.5=1"], {})]),  # two "=": positional
        ("<lora:a b:1>", "", [ExtraNetworkTag("lora", ["a b", "1"], {})]),
        ("<lora> <lora:> <:x> <lo-ra:x> a<b", "<lora> <lora:> <:x> <lo-ra:x> a<b", []),  # none are tags
    ],
)
def test_extract_extra_networks(prompt, text, tags):
    assert extract_extra_networks(prompt) == (text, tags)


# ---- size -------------------------------------------------------------------------------------------------------

def test_long_prompt_is_fast():
    unit = "word (sharp:1.1) [red:blue:0.4] [cat|dog] ((detail)) BREAK "
    prompt = unit * 625  # 5,000 words
    start = time.perf_counter()
    schedule = prompt_schedule(prompt, 30)
    fragments = [parse_attention(text) for _, text in schedule[:3]]
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0
    assert len(schedule) == 30  # alternation: one entry per step
    assert schedule[0][1].startswith("word (sharp:1.1) red cat ((detail)) BREAK word")
    assert len(fragments[0]) > 625 * 4


def test_deep_nesting_does_not_recurse():
    deep = "[" * 3000 + "x" + "]" * 3000
    assert prompt_schedule(deep, 10) == [(10, deep)]
    nested_edits = "x"
    for when in range(1, 1500):
        nested_edits = f"[{nested_edits}:{when % 9 + 1}]"
    assert prompt_schedule(nested_edits, 10)[-1] == (10, "x")
    assert parse_attention("(" * 3000 + "x")[0][0] == "x"
