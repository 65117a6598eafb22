"""Manifests: CSV and JSONL rows become jobs; bad rows become problems; bad files are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emo_async._manifest import ManifestError, ManifestRow, open_manifest


def _write(tmp_path: Path, name: str, data: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def _rows(path: Path) -> list[ManifestRow]:
    return list(open_manifest(path))


def _problems(row: ManifestRow) -> list[tuple[str, str]]:
    return [(p.field, p.message) for p in row.problems]


class TestCsv:
    """CSV manifests: header, encodings, quoting, relative paths and per-row problems."""

    def test_reads_every_column_relative_to_the_manifest(self, tmp_path: Path) -> None:
        path = _write(
            tmp_path,
            "m.csv",
            "image,audio,name,style_level,ratio,face_bbox,ext_bbox\n"
            'a.png,sub/a.wav,one,Calm,1:1,"10,20,110,120","[0, 0, 300, 300]"\n'
            "https://example.com/b.png,/abs/b.wav,,,,,\n",
        )
        first, second = _rows(path)
        assert first.ok
        assert first.row == 2
        job = first.job
        assert job is not None
        assert job.image == tmp_path / "a.png"
        assert job.audio == tmp_path / "sub" / "a.wav"
        assert job.name == "one"
        assert job.style_level == "calm"
        assert job.ratio == "1:1"
        assert job.face_bbox == (10, 20, 110, 120)
        assert job.ext_bbox == (0, 0, 300, 300)
        job2 = second.job
        assert job2 is not None
        assert job2.image == "https://example.com/b.png"
        assert job2.audio == Path("/abs/b.wav")
        assert job2.name is None
        assert job2.style_level == "normal"
        assert job2.ratio is None

    def test_bom_header_case_and_semicolons(self, tmp_path: Path) -> None:
        path = _write(tmp_path, "m.csv", b"\xef\xbb\xbf Image ;AUDIO\r\na.png;a.wav\r\n")
        manifest = open_manifest(path)
        assert manifest.columns == ("image", "audio")
        assert manifest.delimiter == ";"
        (row,) = list(manifest)
        assert row.job is not None
        assert row.job.image == tmp_path / "a.png"

    def test_quoted_values_with_commas_and_quotes(self, tmp_path: Path) -> None:
        path = _write(
            tmp_path, "m.csv", 'image,audio,name\n"a, b.png","x.wav","say ""hi"", twice"\n'
        )
        (row,) = _rows(path)
        assert row.job is not None
        assert row.job.image == tmp_path / "a, b.png"
        assert row.job.name == 'say "hi", twice'

    def test_missing_required_column_refuses_the_file(self, tmp_path: Path) -> None:
        path = _write(tmp_path, "m.csv", "image,voice\na.png,a.wav\n")
        with pytest.raises(ManifestError, match="lacks the required column audio"):
            open_manifest(path)

    def test_duplicate_column_refuses_the_file(self, tmp_path: Path) -> None:
        path = _write(tmp_path, "m.csv", "image,audio,Image\na.png,a.wav,b.png\n")
        with pytest.raises(ManifestError, match="appears twice"):
            open_manifest(path)

    @pytest.mark.parametrize(
        ("data", "match"),
        [
            ("\ufeffimage,audio\n".encode("utf-16"), "UTF-16"),
            (b"im\xe4ge,audio\na.png,a.wav\n", "not UTF-8"),
            (b"", "empty"),
            (b"\x00\x01\x02binary", "binary"),
        ],
    )
    def test_unreadable_files_are_refused(self, tmp_path: Path, data: bytes, match: str) -> None:
        with pytest.raises(ManifestError, match=match):
            open_manifest(_write(tmp_path, "m.csv", data))

    def test_missing_file_and_directory_are_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ManifestError, match="no such file"):
            open_manifest(tmp_path / "nope.csv")
        with pytest.raises(ManifestError, match="directory"):
            open_manifest(tmp_path)

    def test_bad_rows_are_problems_and_good_rows_survive(self, tmp_path: Path) -> None:
        path = _write(
            tmp_path,
            "m.csv",
            b"image,audio,name,face_bbox\n"
            b"good1.png,good1.wav,g1\n"
            b'"x"y.png,a.wav\n'  # row 3: a quote closed in the middle of a value
            b",b.wav,no-image\n"  # row 4
            b"c\xff.png,c.wav\n"  # row 5: not UTF-8
            b'd.png,d.wav,,"1,2,3"\n'  # row 6: a box of three numbers
            b"e.png,e.wav,,1,2,3,4\n"  # row 7: an unquoted box
            b'f.png,f.wav,,"[1, 2, 3.5, 4]"\n'  # row 8: not integers
            b"\n"
            b"good2.png,good2.wav,g2\n",  # row 10
        )
        rows = _rows(path)
        assert [r.row for r in rows] == [2, 3, 4, 5, 6, 7, 8, 10]
        assert [r.ok for r in rows] == [True, False, False, False, False, False, False, True]
        by_row = {r.row: _problems(r) for r in rows}
        assert by_row[3][0][0] == "row"
        assert "bad CSV" in by_row[3][0][1]
        assert by_row[4] == [("image", "missing (the column is required)")]
        assert "not UTF-8" in by_row[5][0][1]
        assert by_row[6][0][0] == "face_bbox"
        assert "fields but the header has 4" in by_row[7][0][1]
        assert by_row[8][0][0] == "face_bbox"
        assert rows[3].audio == "c.wav" or rows[3].audio is None

    def test_unclosed_quote_is_reported_at_its_row(self, tmp_path: Path) -> None:
        path = _write(tmp_path, "m.csv", 'image,audio\na.png,a.wav\n"b.png,b.wav\nc.png,c.wav\n')
        rows = _rows(path)
        assert rows[0].ok
        assert rows[1].row == 3
        assert not rows[1].ok
        assert "never closed" in rows[1].problems[0].message

    def test_trailing_empty_cells_and_rows_are_ignored(self, tmp_path: Path) -> None:
        path = _write(tmp_path, "m.csv", "image,audio\na.png,a.wav,,,\n,,\n,\n")
        rows = _rows(path)
        assert len(rows) == 1
        assert rows[0].ok

    def test_unknown_columns_are_listed(self, tmp_path: Path) -> None:
        path = _write(tmp_path, "m.csv", "image,audio,notes\na.png,a.wav,hello\n")
        assert open_manifest(path).unknown_columns == ("notes",)

    def test_duplicate_names_and_hostile_names_are_kept(self, tmp_path: Path) -> None:
        path = _write(
            tmp_path,
            "m.csv",
            "image,audio,name\n"
            "a.png,a.wav,same\n"
            "b.png,b.wav,same\n"
            "c.png,c.wav,../../etc/passwd\n"
            'd.png,d.wav,"bell\x07\x1b[31mred"\n',
        )
        names = [r.job.name for r in _rows(path) if r.job is not None]
        assert names == ["same", "same", "../../etc/passwd", "bell\x07\x1b[31mred"]

    def test_nul_in_a_path_is_a_problem(self, tmp_path: Path) -> None:
        path = _write(tmp_path, "m.csv", b"image,audio\na\x00.png,a.wav\n")
        (row,) = _rows(path)
        assert _problems(row) == [("image", "contains a NUL character")]

    def test_rows_are_read_lazily(self, tmp_path: Path) -> None:
        lines = ["image,audio"] + [f"p{i}.png,v{i}.wav" for i in range(5000)]
        path = _write(tmp_path, "m.csv", "\n".join(lines) + "\n")
        manifest = open_manifest(path)
        it = iter(manifest)
        first = next(it)
        assert first.row == 2
        assert manifest.count() == 5000


class TestJsonl:
    """JSONL manifests: one object per line, lists for boxes, bad lines as problems."""

    def test_reads_objects_with_lists_and_numbers(self, tmp_path: Path) -> None:
        lines = [
            {"image": "a.png", "audio": "a.wav", "face_bbox": [1, 2, 3, 4], "name": 7},
            {"Image": "b.png", "audio": "b.wav", "ext_bbox": "0,0,10,10", "ratio": None},
        ]
        path = _write(tmp_path, "m.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n")
        first, second = _rows(path)
        assert first.job is not None
        assert first.job.face_bbox == (1, 2, 3, 4)
        assert first.job.name == "7"
        assert first.job.image == tmp_path / "a.png"
        assert second.job is not None
        assert second.job.ext_bbox == (0, 0, 10, 10)

    def test_sniffed_without_a_suffix(self, tmp_path: Path) -> None:
        path = _write(tmp_path, "manifest", '\ufeff{"image": "a.png", "audio": "a.wav"}\n')
        manifest = open_manifest(path)
        assert manifest.format == "jsonl"
        assert [r.ok for r in manifest] == [True]

    def test_bad_lines_are_problems(self, tmp_path: Path) -> None:
        path = _write(
            tmp_path,
            "m.jsonl",
            '{"image": "a.png", "audio": "a.wav"}\n'
            "not json\n"
            "[1, 2]\n"
            '{"image": "b.png"}\n'
            '{"image": ["x"], "audio": "c.wav"}\n'
            '{"image": "d.png", "audio": "d.wav", "face_bbox": [1, 2]}\n'
            "\n"
            '{"image": "e.png", "audio": "e.wav"}\n',
        )
        rows = _rows(path)
        assert [r.row for r in rows] == [1, 2, 3, 4, 5, 6, 8]
        assert [r.ok for r in rows] == [True, False, False, False, False, False, True]
        assert "not valid JSON" in rows[1].problems[0].message
        assert "not an object" in rows[2].problems[0].message
        assert _problems(rows[3]) == [("audio", "missing (the column is required)")]
        assert rows[4].problems[0].field == "image"
        assert rows[5].problems[0].field == "face_bbox"

    def test_first_line_not_json_refuses_the_file(self, tmp_path: Path) -> None:
        with pytest.raises(ManifestError, match="not a JSON object"):
            open_manifest(_write(tmp_path, "m.jsonl", "image,audio\na.png,a.wav\n"))
