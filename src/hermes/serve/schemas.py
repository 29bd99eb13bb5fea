"""The wire: OpenAI request and response bodies as pydantic models, their limits, and the one error shape.

FastAPI validates each request body against :class:`CompletionRequest` / :class:`ChatCompletionRequest`;
:func:`error_handler` turns what it refuses (and every :class:`ServeError`) into the OpenAI error shape
``{"error": {"message", "type", "param", "code"}}``, with a message that names the field, what it must be and what
came. The limits below are the schema's; the one the server knows only at run time (the positions it holds per
request, the upper end of ``max_tokens``) is passed to :func:`error_handler` and checked by the route.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from hermes.errors import HermesError

#: tokens generated when a request names neither max_tokens nor max_completion_tokens
DEFAULT_TOKENS = 16
#: request fields hermes serve does not implement: refused with 400 unless empty (None, false, [], {})
UNSUPPORTED = ("stop", "logprobs", "logit_bias", "tools")


class ServeError(HermesError):
    """A request the server refuses; ``status`` is its HTTP status, ``kind`` the OpenAI error type."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code
        #: seconds a client should wait before retrying (the Retry-After header); 429 and 503 default to 1
        self.retry_after = retry_after if retry_after is not None or status not in (429, 503) else 1


@dataclass(frozen=True)
class Range:
    """The values a numeric field takes (both ends included)."""

    low: float
    high: float
    integer: bool = False

    def describe(self, high: float | None = None) -> str:
        kind = "an integer" if self.integer else "a number"
        return f"{kind} in [{self.low:g}, {self.high if high is None else high:g}]"


#: numeric fields and their ranges; max_tokens' upper end is, at run time, the positions the server holds
RANGES: dict[str, Range] = {
    "max_tokens": Range(1, 10**9, integer=True),
    "max_completion_tokens": Range(1, 10**9, integer=True),
    "temperature": Range(0, 2),
    "top_p": Range(1e-9, 1),
    "top_k": Range(0, 10**9, integer=True),
}
#: what the other fields must be, as the error messages say it
HINTS: dict[str, str] = {
    "model": "a string, the id GET /v1/models lists",
    "n": "1 (one choice per request)",
    "stream": "true or false",
    "prompt": "a string or a list of token ids (one prompt per request)",
    "messages": "a non-empty list of {role, content} objects with string content",
}


def _number(name: str, default: float | None) -> Any:
    r = RANGES[name]
    return Field(default, ge=r.low, le=r.high, strict=True, description=r.describe())


# ---- requests -----------------------------------------------------------------------------------------------

def _unicode(value: Any) -> Any:
    """Refuse text that is not valid Unicode (a lone surrogate such as ``"\\ud800"`` is valid JSON, but no
    tokenizer can encode it), in a string or anywhere inside lists and objects."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PydanticCustomError("unicode", "text is not valid Unicode: a lone surrogate {char} at character "
                                      "{at}; send UTF-8 text (surrogates only in pairs)",
                                      {"char": repr(value[exc.start]), "at": exc.start}) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _unicode(k)
            _unicode(v)
    elif isinstance(value, list):
        for v in value:
            _unicode(v)
    return value


#: text that must be valid Unicode
Text = Annotated[StrictStr, AfterValidator(_unicode)]
#: a prompt: text, token ids, or a list holding one of those (one prompt per request)
Prompt = Text | list[StrictInt] | Annotated[list[Text | list[StrictInt]], Field(min_length=1, max_length=1)]


class GenerationRequest(BaseModel):
    """The fields /v1/completions and /v1/chat/completions share. Unknown fields are ignored; null means the
    default."""

    model: str | None = Field(None, strict=True, description=HINTS["model"])
    n: Literal[1] | None = Field(1, description=HINTS["n"])
    max_tokens: int = _number("max_tokens", DEFAULT_TOKENS)
    max_completion_tokens: int | None = _number("max_completion_tokens", None)
    temperature: float = _number("temperature", 1.0)
    top_p: float = _number("top_p", 1.0)
    top_k: int = _number("top_k", 0)
    stop: Any = None
    logprobs: Any = None
    logit_bias: Any = None
    tools: Any = None
    stream: bool = Field(False, strict=True, description=HINTS["stream"])

    @field_validator("max_tokens", "temperature", "top_p", "top_k", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _refuse(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in (None, False, [], {}):
            raise PydanticCustomError("unsupported", "{field} is not supported by hermes serve; leave it out",
                                      {"field": info.field_name})
        return value

    def token_limit(self) -> tuple[str, int]:
        """The field that sets the number of tokens to generate, and its value."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions``."""

    prompt: Prompt = Field(description=HINTS["prompt"])


class ChatMessage(BaseModel):
    """One message of a chat; other keys (``name``, ...) go to the chat template as they came."""

    model_config = ConfigDict(extra="allow")

    role: Text
    content: Text

    @model_validator(mode="after")
    def _extra_unicode(self) -> ChatMessage:
        _unicode(self.model_extra or {})
        return self


class ChatCompletionRequest(GenerationRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1, description=HINTS["messages"])


# ---- responses ----------------------------------------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class HermesExtra(BaseModel):
    token_ids: list[int]  # the generated tokens


class TextChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    """A finished ``/v1/completions`` answer."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage
    hermes: HermesExtra


class ChatCompletion(BaseModel):
    """A finished ``/v1/chat/completions`` answer."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    hermes: HermesExtra


class Delta(BaseModel):
    """What a streamed chat chunk adds; fields not sent are left out (``{}`` on the last chunk)."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _sent_only(self, handler: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None


class Chunk(BaseModel):
    """One server-sent event of a streamed answer."""

    id: str
    object: Literal["text_completion", "chat.completion.chunk"]
    created: int
    model: str
    choices: list[TextChoice] | list[ChatChunkChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "hermes"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """The OpenAI error shape."""

    error: ErrorDetail

    @classmethod
    def of(cls, exc: ServeError) -> ErrorBody:
        return cls(error=ErrorDetail(message=str(exc), type=exc.kind, param=exc.param, code=exc.code))


# ---- errors -------------------------------------------------------------------------------------------------

def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _body_error(error: Mapping[str, Any]) -> ServeError:
    """An error about the body as a whole (not one of its fields)."""
    kind = error["type"]
    if kind == "json_invalid":
        return ServeError(f"the request body is not valid JSON: {error.get('ctx', {}).get('error', '')} "
                          f"(at character {error['loc'][-1]})")
    if kind == "missing":
        return ServeError("the request body is empty; send a JSON object")
    if isinstance(error.get("input"), bytes):
        return ServeError("the request body must be JSON: send it with the header 'Content-Type: application/json'")
    return ServeError("the request body must be a JSON object")


def validation_error(errors: list[Mapping[str, Any]], body: Any, *, highs: Mapping[str, int]) -> ServeError:
    """The first of FastAPI's validation ``errors`` as a ServeError: which field, what it must be, what came.
    ``highs``: upper ends of RANGES known only at run time."""
    # a union's branches each report an error: invalid Unicode says more than "not a list of ids"
    error = next((e for e in errors if e["type"] == "unicode"), errors[0])
    loc = error["loc"]
    if len(loc) < 2 or loc[0] != "body" or not isinstance(loc[1], str):
        return _body_error(error)
    field = loc[1]
    if error["type"] == "unsupported":
        return ServeError(error["msg"], param=field)
    if error["type"] == "unicode":
        return ServeError(f"{field}: {error['msg']}", param=field, code="invalid_unicode")
    if field in RANGES:
        what = RANGES[field].describe(highs.get(field))
    elif field in HINTS:
        what = HINTS[field]
    else:
        return ServeError(f"{field}: {error['msg']}", param=field)
    if error["type"] == "missing":
        return ServeError(f"{field} is required: {what}", param=field)
    value = body.get(field) if isinstance(body, dict) else error.get("input")
    return ServeError(f"{field} must be {what}, got {_shown(value)}", param=field)


def error_response(exc: ServeError) -> Any:
    """``exc`` as an HTTP response in the OpenAI error shape, with its status."""
    from fastapi.responses import JSONResponse

    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return JSONResponse(ErrorBody.of(exc).model_dump(), status_code=exc.status, headers=headers)


def error_handler(*, highs: Mapping[str, int]) -> Callable[[Any, Exception], Awaitable[Any]]:
    """The one exception handler of the app: ServeError, FastAPI's RequestValidationError and HTTP errors (an
    unknown route, a wrong method) answered in the OpenAI error shape."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    async def handle(request: Any, exc: Exception) -> Any:
        if isinstance(exc, RequestValidationError):
            exc = validation_error(list(exc.errors()), exc.body, highs=highs)
        elif isinstance(exc, HTTPException):
            kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
            exc = ServeError(str(exc.detail), status=exc.status_code, kind=kind)
        assert isinstance(exc, ServeError), exc
        return error_response(exc)

    return handle
