"""What ``init(working_dir=...)`` sends: git's ignore rules, nested files included."""

from __future__ import annotations

import pytest

from strato.client.workdir import manifest

pytestmark = pytest.mark.timeout(30)


def test_manifest_follows_gitignore_files_at_every_level(tmp_path):
    files = {
        ".gitignore": "*.ckpt\n/build/\ndata/\n!keep.ckpt\n",
        "train.py": "print('hi')\n",
        "model.ckpt": "big",
        "keep.ckpt": "small",
        "build/out.o": "x",
        "src/build/mod.py": "kept: /build is anchored at the root",
        "src/data/x.csv": "left out: data/ matches at any depth",
        "src/.gitignore": "*.tmp\n!important.tmp\n",
        "src/a.tmp": "left out by the nested file",
        "src/important.tmp": "negated in the nested file",
        "other/b.tmp": "the nested file does not apply here",
        ".venv/pyvenv.cfg": "home = /usr",
        ".venv/lib.py": "a virtualenv never travels",
        "__pycache__/m.pyc": "never",
    }
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert sorted(manifest(str(tmp_path))) == [
        ".gitignore", "keep.ckpt", "other/b.tmp", "src/.gitignore", "src/build/mod.py",
        "src/important.tmp", "train.py"]
