"""`RequestFailedError` and `RemoteError`: what `submit` raises for a request that ended unprocessed."""

from __future__ import annotations

import pickle

from llm_queue_dispatcher import (
    LLMQueueDispatcherError,
    PermanentError,
    RemoteError,
    RequestFailedError,
)


def test_request_failed_error_names_the_request_and_keeps_the_last_error() -> None:
    cause = PermanentError("bad request")
    error = RequestFailedError("r1", cause)
    assert isinstance(error, LLMQueueDispatcherError)
    assert error.request_id == "r1"
    assert error.error is cause
    assert "'r1'" in str(error)
    assert "bad request" in str(error)


def test_request_failed_error_survives_pickling() -> None:
    error = pickle.loads(pickle.dumps(RequestFailedError("r1", PermanentError("no"))))
    assert error.request_id == "r1"
    assert isinstance(error.error, PermanentError)
    assert str(error.error) == "no"


def test_remote_error_carries_the_http_response_and_survives_pickling() -> None:
    error = RemoteError("openai.BadRequestError", "bad", status_code=400, headers={"a": "b"}, body={"x": 1})
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.type_name, copy.message, copy.status_code, copy.headers, copy.body) == (
        "openai.BadRequestError",
        "bad",
        400,
        {"a": "b"},
        {"x": 1},
    )
    assert str(copy) == "openai.BadRequestError: bad"
