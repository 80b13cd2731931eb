"""Resolving the VGG16 weights before work starts: local files, Keras' cache, a failed download."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from leukemia import weights
from leukemia.weights import (
    IMAGENET_NOTOP_FILE,
    WeightsUnavailable,
    keras_cache_dir,
    normalize,
    resolve_weights,
)


@pytest.fixture()
def empty_keras_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Keras cache, so that nothing a developer downloaded earlier is found."""
    home = tmp_path / "keras"
    monkeypatch.setenv("KERAS_HOME", str(home))
    return home


@pytest.mark.parametrize("given", ["none", "None", "", None, "  none "])
def test_none_and_empty_mean_random_initialisation(given: str | None) -> None:
    assert normalize(given) == "none"
    assert resolve_weights(given) == "none"


def test_a_weights_file_resolves_to_its_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "w.h5").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert resolve_weights("w.h5") == str(tmp_path / "w.h5")


def test_a_missing_weights_file_is_one_line_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailable) as err:
        resolve_weights(str(tmp_path / "nowhere.h5"))
    message = str(err.value)
    assert "\n" not in message
    assert "nowhere.h5 does not exist" in message
    assert "LEUKEMIA_WEIGHTS" in message and "none" in message


def test_imagenet_in_the_keras_cache_is_used_without_a_download(
    empty_keras_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (empty_keras_home / "models").mkdir(parents=True)
    (empty_keras_home / "models" / IMAGENET_NOTOP_FILE).write_bytes(b"cached")

    def no_download(*args: object, **kwargs: object) -> Path:
        raise AssertionError("the cached file must be used")

    monkeypatch.setattr(weights, "download_imagenet", no_download)
    assert keras_cache_dir() == empty_keras_home / "models"
    assert resolve_weights("ImageNet") == "imagenet"


def test_imagenet_offline_fails_fast_in_one_line_and_leaves_no_partial_file(
    offline: dict[str, str], empty_keras_home: Path
) -> None:
    started = time.monotonic()
    with pytest.raises(WeightsUnavailable) as err:
        resolve_weights("imagenet")
    message = str(err.value)
    assert time.monotonic() - started < 20
    assert "\n" not in message
    assert "could not be downloaded" in message
    assert str(empty_keras_home / "models" / IMAGENET_NOTOP_FILE) in message
    assert "LEUKEMIA_WEIGHTS" in message
    assert not list((empty_keras_home / "models").glob("*"))


def test_imagenet_without_downloads_says_so(empty_keras_home: Path) -> None:
    with pytest.raises(WeightsUnavailable, match="downloads are off"):
        resolve_weights("imagenet", download=False)
