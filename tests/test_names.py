from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emo_async._exceptions import DownloadError
from emo_async._names import MAX_STEM_BYTES, OutputNames, safe_stem

WINDOWS_INVALID = set('<>:"/\\|?*')
RESERVED = {"CON", "PRN", "AUX", "NUL"} | {f"{p}{i}" for p in ("COM", "LPT") for i in range(1, 10)}


class TestSafeStem:
    """Untrusted names become stems that are safe everywhere."""

    @pytest.mark.parametrize(
        ("name", "expected"),
        [
            ("../x", "x"),
            ("../../etc/passwd", "passwd"),
            ("/etc/passwd", "passwd"),
            ("C:\\x", "x"),
            ("C:\\Windows\\..\\evil", "evil"),
            ("dir/sub/", "sub"),
            ("..", "fallback"),
            ("/", "fallback"),
            ("", "fallback"),
            ("  . ", "fallback"),
        ],
    )
    def test_directory_parts_are_dropped(self, name: str, expected: str) -> None:
        assert safe_stem(name, fallback="fallback") == expected

    @pytest.mark.parametrize(
        ("name", "expected"),
        [
            ("CON", "CON_"),
            ("con", "con_"),
            ("nul.txt", "nul_.txt"),
            ("Com1", "Com1_"),
            ("LPT9.tar.gz", "LPT9_.tar.gz"),
            ("aux ", "aux_"),
            ("console", "console"),
            ("COM10", "COM10"),
        ],
    )
    def test_windows_reserved_names_get_a_suffix(self, name: str, expected: str) -> None:
        assert safe_stem(name, fallback="f") == expected

    def test_control_characters_and_nul_are_dropped(self) -> None:
        assert safe_stem("a\x00b\x1fc\x7fd\ne\u202efdp.exe", fallback="f") == "abcdefdp.exe"

    def test_windows_invalid_characters_are_replaced(self) -> None:
        assert safe_stem('a<b>c:d"e|f?g*h', fallback="f") == "a_b_c_d_e_f_g_h"

    def test_leading_and_trailing_dots_and_spaces_are_stripped(self) -> None:
        assert safe_stem(" ..hidden name.. ", fallback="f") == "hidden name"

    def test_nfc_normalisation(self) -> None:
        assert safe_stem("e\u0301t\u00e9", fallback="f") == "\u00e9t\u00e9"

    def test_length_cap_never_splits_a_character(self) -> None:
        stem = safe_stem("\u00e9" * 200 + "x", fallback="f")
        assert len(stem.encode("utf-8")) <= MAX_STEM_BYTES
        assert stem == "\u00e9" * (MAX_STEM_BYTES // 2)
        emoji = safe_stem("\U0001f600" * 100, fallback="f")
        assert emoji == "\U0001f600" * (MAX_STEM_BYTES // 4)

    def test_fallback_is_sanitised_too(self) -> None:
        assert safe_stem("..", fallback="../task/123") == ".._task_123".lstrip(".")
        assert safe_stem("..", fallback="") == "video"

    @settings(max_examples=400, deadline=None)
    @given(st.text(), st.text(min_size=1))
    def test_any_text_gives_a_safe_stem(self, name: str, fallback: str) -> None:
        stem = safe_stem(name, fallback=fallback)
        assert stem
        assert not (set(stem) & WINDOWS_INVALID)
        assert not any(ord(c) < 32 or ord(c) == 127 for c in stem)
        assert stem not in (".", "..")
        assert stem[0] not in ". "
        assert stem[-1] not in ". "
        assert len(stem.encode("utf-8")) <= MAX_STEM_BYTES + 1
        assert stem.split(".")[0].rstrip(" ").upper() not in RESERVED
        assert safe_stem(stem, fallback="x") == stem  # idempotent


class TestOutputNames:
    """Output paths are deterministic, distinct per job and always inside out_dir."""

    def test_same_job_same_path(self, tmp_path: Path) -> None:
        names = OutputNames(tmp_path)
        first = names.assign("clip", "a1b2c3d4e5f6")
        assert first == tmp_path / "clip.mp4"
        assert names.assign("clip", "a1b2c3d4e5f6") == first

    def test_collisions_get_the_key(self, tmp_path: Path) -> None:
        names = OutputNames(tmp_path)
        assert names.assign("clip", "aaaaaaaa1111") == tmp_path / "clip.mp4"
        assert names.assign("../clip", "bbbbbbbb2222") == tmp_path / "clip-bbbbbbbb.mp4"
        assert names.assign("CLIP", "cccccccc3333") == tmp_path / "CLIP-cccccccc.mp4"
        assert names.assign("clip", "aaaaaaaa1111") == tmp_path / "clip.mp4"

    def test_collision_with_a_suffixed_name_escalates(self, tmp_path: Path) -> None:
        names = OutputNames(tmp_path)
        assert names.assign("x", "k1") == tmp_path / "x.mp4"
        assert names.assign("x-deadbeef", "k2") == tmp_path / "x-deadbeef.mp4"
        got = names.assign("x", "deadbeef00112233445566")
        assert got == tmp_path / "x-deadbeef00112233.mp4"

    def test_the_same_in_a_new_run(self, tmp_path: Path) -> None:
        jobs = [("a", "k1"), ("a", "k2"), ("b", "k3"), ("", "k4"), ("../a", "k5")]
        earlier = OutputNames(tmp_path)
        first = [earlier.assign(*job) for job in jobs]
        names = OutputNames(tmp_path)
        assert [names.assign(*job) for job in jobs] == first
        assert len(set(first)) == len(first)

    def test_unnamed_job_uses_its_key(self, tmp_path: Path) -> None:
        assert OutputNames(tmp_path).assign("", "task-123") == tmp_path / "task-123.mp4"

    def test_symlinked_name_escaping_out_dir_is_refused(self, tmp_path: Path) -> None:
        out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
        out.mkdir()
        elsewhere.mkdir()
        os.symlink(elsewhere / "clip.mp4", out / "clip.mp4")
        with pytest.raises(DownloadError, match="outside"):
            OutputNames(out).assign("clip", "k1")

    def test_symlinked_out_dir_is_fine(self, tmp_path: Path) -> None:
        real = tmp_path / "real"
        real.mkdir()
        (tmp_path / "link").symlink_to(real)
        assert OutputNames(tmp_path / "link").assign("a", "k") == tmp_path / "link" / "a.mp4"

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.tuples(st.text(), st.text(min_size=1)), max_size=12))
    def test_paths_are_inside_and_distinct(
        self, tmp_path_factory: pytest.TempPathFactory, jobs: list[tuple[str, str]]
    ) -> None:
        out = tmp_path_factory.getbasetemp() / "names-prop"
        names = OutputNames(out)
        seen: dict[str, tuple[str, str]] = {}
        for job in jobs:
            path = names.assign(*job)
            assert path.parent == out
            assert os.path.realpath(path.parent) == os.path.realpath(out)
            assert path.name.endswith(".mp4")
            folded = path.name.casefold()
            assert seen.setdefault(folded, job) == job
