"""Write the hostile-input corpus of ``tests/test_hostile.py`` into this folder.

Run ``python tests/hostile/make_corpus.py`` after changing it; the files are committed (the
whole folder stays well under 1 MB). Files too big to commit (a 15 MB WAV, a 60 s WAV) are
made by the tests in a temporary folder. ``cases.json`` is written by hand.
"""

from __future__ import annotations

import struct
import sys
import wave
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

from emo_async._samples import make_portrait, make_silent_mp3, make_voice_wav  # noqa: E402

FILES = HERE / "files"
MANIFESTS = HERE / "manifests"


def _solid_png(path: Path, size: tuple[int, int], fmt: str = "PNG") -> None:
    from PIL import Image

    Image.new("L", size, 128).save(path, fmt, optimize=True)


def _wav_header(data_bytes: int, *, rate: int = 16000) -> bytes:
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return (
        b"RIFF"
        + struct.pack("<I", 36 + data_bytes)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", data_bytes)
    )


def images() -> None:
    make_portrait(FILES / "portrait.png", size=(400, 500), seed=1)
    # A PNG named .jpg: formats come from the bytes, so this one is accepted (as PNG).
    make_portrait(FILES / "png-named.jpg", size=(400, 500), fmt="png", seed=2)
    # Same picture as JPEG (the format the name promises), for the boundary cases' peers.
    (FILES / "text-named.png").write_text("this is not a picture\n" * 4)
    (FILES / "jpeg-soi-only.jpg").write_bytes(b"\xff\xd8\xff")
    (FILES / "jpeg-garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 2)
    png = (FILES / "portrait.png").read_bytes()
    (FILES / "png-truncated.png").write_bytes(png[:20])
    (FILES / "empty.png").write_bytes(b"")
    (FILES / "wav-named.png").write_bytes(_wav_header(3200) + bytes(3200))
    (FILES / "pdf-named.png").write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n")
    (FILES / "no-magic.jpg").write_bytes(bytes([0, 1, 2, 3, 250, 251, 252, 0]) * 16)
    (FILES / "bmp-truncated.bmp").write_bytes(b"BM\x36\x00\x00\x00\x00\x00")
    (FILES / "webp-truncated.webp").write_bytes(b"RIFF\x24\x00\x00\x00WEBPVP8 ")
    from PIL import Image

    Image.new("RGB", (400, 400), (200, 100, 50)).save(FILES / "animated.gif", "GIF")
    _solid_png(FILES / "side-399.png", (399, 400))
    _solid_png(FILES / "side-400.png", (400, 400))
    _solid_png(FILES / "side-7000.png", (7000, 400))
    _solid_png(FILES / "side-7001.png", (7001, 400))
    _solid_png(FILES / "tiny-1x1.png", (1, 1))


def audio() -> None:
    make_voice_wav(FILES / "voice.wav", 1.0, seed=3)
    make_silent_mp3(FILES / "silent.mp3", 1.0)
    (FILES / "text-named.wav").write_text("RIFF? no: just words pretending to be audio\n")
    (FILES / "header-only.wav").write_bytes(_wav_header(0))
    (FILES / "riff-truncated.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVE")
    (FILES / "empty.wav").write_bytes(b"")
    (FILES / "png-named.wav").write_bytes((FILES / "portrait.png").read_bytes()[:4096])
    (FILES / "ogg-named.wav").write_bytes(b"OggS\x00\x02" + bytes(58))
    (FILES / "aac-named.mp3").write_bytes(b"\xff\xf1\x50\x80\x02\x1f\xfc" + bytes(64))
    (FILES / "id3-then-garbage.mp3").write_bytes(
        b"ID3\x04\x00\x00\x00\x00\x00\x0a" + bytes(10) + b"\x13\x37garbage" * 40
    )
    (FILES / "mp3-sync-garbage.mp3").write_bytes(b"\xff\xfb\x90\x64" + b"\x00" * 4 + b"zz" * 50)
    with wave.open(str(FILES / "zero-frames-8bit.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(8000)


def manifests() -> None:
    MANIFESTS.mkdir(exist_ok=True)
    (MANIFESTS / "missing-audio-column.csv").write_text("image,name\nportrait.png,a\n")
    (MANIFESTS / "bom.csv").write_bytes(
        "\ufeffimage,audio,name\n../files/portrait.png,../files/voice.wav,bom\n".encode()
    )
    (MANIFESTS / "latin1.csv").write_bytes(
        "image,audio,name\n../files/portrait.png,../files/voice.wav,café\n".encode("latin-1")
    )
    (MANIFESTS / "utf16.csv").write_bytes("image,audio\na.png,a.wav\n".encode("utf-16"))
    (MANIFESTS / "unbalanced-quote.csv").write_text(
        'image,audio,name\n../files/portrait.png,../files/voice.wav,"never closed\n'
        "../files/portrait.png,../files/voice.wav,after\n"
    )
    (MANIFESTS / "hostile-names.csv").write_text(
        "image,audio,name\n"
        "../files/portrait.png,../files/voice.wav,../../escape\n"
        "../files/portrait.png,../files/voice.wav,/etc/passwd\n"
        "../files/portrait.png,../files/voice.wav,dup\n"
        "../files/portrait.png,../files/silent.mp3,dup\n"
        '../files/portrait.png,../files/voice.wav,"a ""quoted"", name"\n'
    )
    (MANIFESTS / "bad-rows.jsonl").write_text(
        '{"image": "../files/portrait.png", "audio": "../files/voice.wav", "name": "ok"}\n'
        '{"image": "../files/portrait.png"}\n'
        "[1, 2, 3]\n"
        "{not json\n"
        '{"image": "../files/portrait.png", "audio": "a\\u0000b.wav"}\n'
        '{"image": "../files/portrait.png", "audio": "../files/voice.wav", "face_bbox": "1,2"}\n'
    )
    (MANIFESTS / "empty.csv").write_bytes(b"")


def main() -> None:
    FILES.mkdir(parents=True, exist_ok=True)
    images()
    audio()
    manifests()
    total = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file())
    print(f"wrote the corpus: {total:,} bytes in {HERE}")


if __name__ == "__main__":
    main()
