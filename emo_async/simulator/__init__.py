"""A faithful, offline simulator of Alibaba DashScope's EMO service.

Use it three ways::

    async with Simulator(SimulatorConfig(time_scale=0.01)) as sim:
        sim.base_url, sim.api_key    # point a client here
    python -m emo_async.simulator --port 8000    # or: emo-async simulator
    app = create_app(SimulatorConfig())          # an aiohttp.web.Application

It speaks the protocol of the emo-v1 / emo-detect-v1 documents: ``face-detect``, the async
``video-synthesis`` submit, ``GET /tasks/{id}``, ``GET /tasks``, ``POST /tasks/{id}/cancel``,
``GET /uploads?action=getPolicy`` with an OSS-like upload host (``oss://`` inputs resolve only
with ``X-DashScope-OssResourceResolve: enable``), and a media host serving result videos at
signed URLs (``Expires``, ``ETag``, ``Range``/``If-Range``). Limits (Bearer keys, token
buckets answering 429 ``Throttling.RateQuota``, a FIFO concurrency cap), the task lifecycle
(PENDING → PRE-PROCESSING → RUNNING → POST-PROCESSING → SUCCEEDED | FAILED, CANCELED; UNKNOWN
after retention) and seeded faults (:class:`FaultConfig`) are configurable; a :class:`Ledger`
records every request and every task created, with the inputs it was made from
(``ledger.task_inputs(task_id)``). ``FaultConfig.other_program_interval`` and
``Simulator.create_foreign_task()`` play another program billing the same account and key
(``ledger.foreign_tasks``).

Inputs are really validated: the simulator downloads ``image_url`` / ``audio_url`` — from
loopback addresses only (or ``oss://`` uploads); anything else is refused with InvalidURL and
never contacted — and reads the format from the bytes (JPEG, PNG, BMP, WEBP images; WAV and
MP3 audio), the image size and the audio duration. Downloads are cached by URL.

Content errors that would need a vision model are triggered deterministically:

* a PNG text chunk (``tEXt``/``iTXt``) with key ``emo-sim`` whose value is one of
  ``InvalidFile.Content:none`` (no person), ``InvalidFile.Content:multi`` (several people),
  ``InvalidFile.BodyProportion``, ``InvalidFile.Value`` (too dark), ``InvalidFile.FrontBody``
  (back view), ``InvalidFile.FullFace`` (face not whole), ``InvalidFile.FacePose``;
* for any format, ``SimulatorConfig.content_rules``: sha256 (hex) of the image bytes → one of
  those values.

emo-detect-v1 answers such an image with ``check_pass: false`` and the documented message;
emo-v1, if the image is submitted anyway, creates the task and fails it at the end of
PRE-PROCESSING with that code and message.

The "face" that emo-detect-v1 finds is the top of whatever differs from the background: each
row's background is the mean of its two edge pixels, the subject is what differs from it, and
the head is the subject's top rows, down to the shoulders (a sudden widening) or 1.25× its
width. A plain image, or a photo whose subject fills the frame, gets a centred box (30 % of
the short side, centred at 42 % of the height). ``ext_bbox`` is exactly
1:1 or 3:4, inside the image and contains the face; when no such box exists the answer is
``check_pass: false`` with the InvalidFile.BodyProportion message.

Time: ``SimulatorConfig.time_scale`` real seconds pass per simulated second for the task
lifecycle and every validity window; ``sim.clock.advance(s)`` jumps simulated time. Answer
times (``submit_time``, ``end_time``, ``gmt_create``), the ``Expires`` of video URLs and the
upload policy's expiry are on the REAL clock, so a client may compare them with its own
(durations between them are scaled). Rate limits are in real requests per real second.
"""

from __future__ import annotations

from ._app import SIM_KEY, SimState, create_app
from ._clock import SimClock
from ._config import ENDPOINTS, FaultConfig, SimulatorConfig
from ._ledger import Ledger, RequestRecord, TaskInputs, TaskRecord
from ._server import Simulator
from ._state import TaskSnapshot

__all__ = [
    "ENDPOINTS",
    "SIM_KEY",
    "FaultConfig",
    "Ledger",
    "RequestRecord",
    "SimClock",
    "SimState",
    "Simulator",
    "SimulatorConfig",
    "TaskInputs",
    "TaskRecord",
    "TaskSnapshot",
    "create_app",
]
