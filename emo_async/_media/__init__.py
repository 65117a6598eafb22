"""Local validation of a job's inputs, before anything is uploaded, detected or billed.

Formats are told from the bytes, never from the file name: a PNG named ``.jpg`` is a PNG, and
a text file named ``.wav`` is refused as text. Image headers are read with Pillow and audio
durations with mutagen; both are imported on first use so ``import emo_async`` stays light.
File work runs in worker threads (one hop per file); the event loop never blocks.
"""

from ._audio import probe_audio
from ._checks import check_audio, check_boxes, check_image, check_ratio, check_style
from ._estimate import Estimate, estimate
from ._hashing import _hash_file as _hash_file
from ._hashing import sha256_file
from ._image import probe_image
from ._records import (
    LIMITS,
    AudioInfo,
    ImageInfo,
    MediaLimits,
    MediaProbeError,
    PreparedInput,
    ValidatedJob,
)
from ._validate import validate_job
from ._validate import validate_keeping as validate_keeping

__all__ = [
    "LIMITS",
    "AudioInfo",
    "Estimate",
    "ImageInfo",
    "MediaLimits",
    "MediaProbeError",
    "PreparedInput",
    "ValidatedJob",
    "check_audio",
    "check_boxes",
    "check_image",
    "check_ratio",
    "check_style",
    "estimate",
    "probe_audio",
    "probe_image",
    "sha256_file",
    "validate_job",
]
