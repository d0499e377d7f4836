"""A1111 styles.csv: reading, merging (modules/styles.py merge_prompts), extraction, atomic edits."""
import pytest

from sdstudio.errors import InvalidRequestError
from sdstudio.prompt.styles import PromptStyle, StyleDB, merge_prompts

CSV = (
    "\ufeffname,prompt,negative_prompt,extra\r\n"  # BOM and an extra column, as files edited by hand often have
    'wrap,"masterpiece, {prompt}, 4k","lowres, {prompt}",x\r\n'
    'sharp, "sharp, detailed", blurry,\r\n'  # space after the comma before a quote (skipinitialspace)
    '# comment,ignored,ignored,\r\n'
    '"multi","line one\nline two",,\r\n'
    "\r\n"
    "posonly,red\r\n"  # short row: negative missing
)


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text(CSV, encoding="utf-8", newline="")
    return StyleDB(path)


def test_reads_a1111_csv(db):
    assert db.names() == ["wrap", "sharp", "multi", "posonly"]
    assert db.styles["wrap"] == PromptStyle("wrap", "masterpiece, {prompt}, 4k", "lowres, {prompt}")
    assert db.styles["sharp"] == PromptStyle("sharp", "sharp, detailed", "blurry")
    assert db.styles["multi"].prompt == "line one\nline two"
    assert db.styles["posonly"] == PromptStyle("posonly", "red", "")


def test_old_name_text_format(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text("name,text\nold,vintage photo\n", encoding="utf-8")
    assert StyleDB(path).styles["old"] == PromptStyle("old", "vintage photo", "")


def test_missing_file_has_no_styles(tmp_path):
    assert StyleDB(tmp_path / "nope.csv").names() == []


@pytest.mark.parametrize(
    "style,prompt,expected",
    [
        ("masterpiece, {prompt}, 4k", "cat", "masterpiece, cat, 4k"),  # placeholder replaced, prompt not stripped
        ("{prompt} and {prompt}", " cat", " cat and  cat"),  # every placeholder
        ("4k", "cat ", "cat, 4k"),  # appended with ", " after stripping both
        ("4k", "", "4k"),  # empty parts dropped
        ("", "  cat ", "cat"),
        ("  ", "", ""),
    ],
)
def test_merge_prompts(style, prompt, expected):
    assert merge_prompts(style, prompt) == expected


def test_apply_styles_in_order(db):
    prompt, negative = db.apply_styles("cat", "", ["wrap", "sharp"])
    # wrap: "masterpiece, cat, 4k" / "lowres, "; then sharp appended to each
    assert prompt == "masterpiece, cat, 4k, sharp, detailed"
    assert negative == "lowres,, blurry"  # "lowres, " is stripped before the join


def test_unknown_style_merges_empty_text(db):
    assert db.apply_styles("  cat ", " ugly", ["no such style"]) == ("cat", "ugly")


def test_extract_styles_round_trip(db):
    prompt, negative = db.apply_styles("1girl, art by greg", "bad hands", ["wrap", "sharp"])
    assert db.extract_styles_from_prompt(prompt, negative) == (["wrap", "sharp"], "1girl, art by greg", "bad hands")


def test_extract_needs_both_texts_to_match(db):
    # the positive ends with sharp's text but the negative lacks "blurry": nothing is extracted
    assert db.extract_styles_from_prompt("cat, sharp, detailed", "ugly") == ([], "cat, sharp, detailed", "ugly")


def test_add_delete_save_atomically(db, tmp_path):
    path = tmp_path / "styles.csv"
    db.add(PromptStyle("new", 'say "hi", {prompt}', "bad"))
    assert (tmp_path / "styles.csv.bak").read_bytes() == CSV.encode()  # previous file kept
    raw = path.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbfname,prompt,negative_prompt\r\n")  # UTF-8 BOM and A1111's header
    again = StyleDB(path)
    assert again.styles["new"] == PromptStyle("new", 'say "hi", {prompt}', "bad")
    assert again.styles["multi"].prompt == "line one\nline two"
    again.delete("sharp")
    assert "sharp" not in StyleDB(path).names()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["styles.csv", "styles.csv.bak"]  # no temporary left


def test_delete_unknown_and_bad_names_are_refused(db):
    with pytest.raises(InvalidRequestError, match="nope"):
        db.delete("nope")
    with pytest.raises(InvalidRequestError, match="name"):
        db.add(PromptStyle("# hidden", "x"))
