"""The documented error codes and messages, and the exception handlers raise to answer them."""

from __future__ import annotations

from typing import Final

__all__ = ["CONTENT_ERRORS", "ApiError", "Msg"]


class Msg:
    """Exact messages of the emo-v1 document and the general DashScope table."""

    BAD_PARAMETER: Final = (
        "The request is missing required parameters or in a wrong format, please check the "
        "parameters that you send."
    )
    BAD_STYLE: Final = "The style_level is invalid."
    BAD_IMAGE_URL: Final = (
        "The request URL is invalid, please check the request URL is available and the request "
        "image format is one of the following types: JPEG, JPG, PNG, BMP, and WEBP."
    )
    MISSING_URL: Final = "Required URL is missing or invalid, please check the request URL."
    AUDIO_TOO_LONG: Final = "The input audio is longer than 60s!"
    AUDIO_TOO_LARGE: Final = "File size is larger than 15MB."
    AUDIO_TYPE: Final = "File type is not supported. Allowed types are: .wav, .mp3."
    RESOLUTION: Final = (
        "The image resolution is invalid, please make sure that the largest length of image is "
        "smaller than 7000, and the smallest length of image is larger than 400."
    )
    INVALID_KEY: Final = "Invalid API-key provided."
    RATE_QUOTA: Final = "Requests rate limit exceeded, please try again later."
    INTERNAL: Final = (
        "An internal error has occured, please try again later or contact service support."
    )
    UNAVAILABLE: Final = "The model is unavailable, please try again later."
    SYNC_UNSUPPORTED: Final = "current user api does not support synchronous calls"
    CANCEL_UNSUPPORTED: Final = (
        "Failed to cancel the task, please confirm if the task is in PENDING status."
    )
    NOT_FOUND: Final = "The requested resource was not found."
    MODEL_NOT_FOUND: Final = "Model not exist."


#: Content error trigger → (code, message) of the emo-v1 document.
CONTENT_ERRORS: Final[dict[str, tuple[str, str]]] = {
    "InvalidFile.Content:none": (
        "InvalidFile.Content",
        "The input image has no human body. Please upload other image with single person.",
    ),
    "InvalidFile.Content:multi": (
        "InvalidFile.Content",
        "The input image has multi human bodies. Please upload other image with single person.",
    ),
    "InvalidFile.BodyProportion": (
        "InvalidFile.BodyProportion",
        "The proportion of the detected person in the picture is too large or too small, "
        "please upload other image.",
    ),
    "InvalidFile.Value": (
        "InvalidFile.Value",
        "The value of the image is invalid, please upload other clearer image.",
    ),
    "InvalidFile.FrontBody": (
        "InvalidFile.FrontBody",
        "The pose of the detected person is invalid, please upload other image with the front "
        "view.",
    ),
    "InvalidFile.FullFace": (
        "InvalidFile.FullFace",
        "The pose of the detected face is invalid, please upload other image with whole face.",
    ),
    "InvalidFile.FacePose": (
        "InvalidFile.FacePose",
        "The pose of the detected face is invalid, please upload other image with the expected "
        "oriention.",
    ),
}


class ApiError(Exception):
    """Answer the current API request with a DashScope error body."""

    def __init__(
        self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    @classmethod
    def bad_parameter(cls, message: str = Msg.BAD_PARAMETER) -> ApiError:
        """400 InvalidParameter."""
        return cls(400, "InvalidParameter", message)

    @classmethod
    def invalid_url(cls, message: str) -> ApiError:
        """400 InvalidURL."""
        return cls(400, "InvalidURL", message)
