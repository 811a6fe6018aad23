"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: ``tiny_checkpoint(arch, **kwargs)`` -> folder of a tiny saved model, built once per arguments.

    Arguments are those of :func:`globe.synthetic.build_tiny_checkpoint`. The folder is shared by the whole
    session: tests that damage a checkpoint must copy it first (see ``copy_checkpoint``).
    """
    from globe.synthetic import build_tiny_checkpoint

    cache = {}

    def build(arch, **kwargs):
        key = (arch, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        if key not in cache:
            cache[key] = build_tiny_checkpoint(arch, tmp_path_factory.mktemp(f"ckpt_{arch}"), **kwargs)
        return cache[key]

    return build


@pytest.fixture
def copy_checkpoint(tmp_path):
    """Factory: ``copy_checkpoint(folder)`` -> a private copy of a checkpoint folder under tmp_path."""
    import shutil

    def copy(folder):
        dest = tmp_path / folder.name
        shutil.copytree(folder, dest)
        return dest

    return copy
