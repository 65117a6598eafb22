"""The curated public surface of ``emo_async``."""

from __future__ import annotations

import subprocess
import sys

import emo_async


class TestPublicAPI:
    """Everything exported is importable, documented and reports the public module."""

    def test_all_is_unique_and_importable(self) -> None:
        # The order is ruff's (RUF022: constants, classes, functions), checked by the linter.
        assert len(set(emo_async.__all__)) == len(emo_async.__all__)
        for name in emo_async.__all__:
            assert hasattr(emo_async, name), name

    def test_public_classes_report_the_package(self) -> None:
        for name in emo_async.__all__:
            obj = getattr(emo_async, name)
            if isinstance(obj, type):
                assert obj.__module__ == "emo_async", name
                assert obj.__doc__, name

    def test_what_the_command_line_needs_is_public(self) -> None:
        # The CLI is built on the public API only (tests/test_cli.py checks its imports).
        for name in ("JobPhase", "make_sample_set", "open_journal", "validate_job", "Client"):
            assert name in emo_async.__all__, name
        assert emo_async.JobPhase("submitted") is emo_async.JobPhase.SUBMITTED

    def test_error_tree_has_one_root(self) -> None:
        for name in emo_async.__all__:
            obj = getattr(emo_async, name)
            if isinstance(obj, type) and issubclass(obj, BaseException):
                assert issubclass(obj, emo_async.EmoError), name

    def test_import_stays_light(self) -> None:
        code = (
            "import sys, emo_async; "
            "print(','.join(m for m in ('PIL', 'mutagen', 'rich', 'av', 'numpy', "
            "'emo_async.simulator') if m in sys.modules))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        assert out == ""
