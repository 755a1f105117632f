"""The scoring server (``scpretrain serve``): MLflow's scoring app and protocol for a registered
annotator, with each JSON request checked before it reaches the model (unknown keys and
parameters refused, not ignored) and error bodies that say what to fix, with no stack trace and
no echo of the request's data."""

import json
import logging
import re

from scpretrain_dist.config import UserError

_FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")
_MAX_MESSAGE = 1000
_log = logging.getLogger("scpretrain.serve")


class RequestError(UserError):
    """A request the server refuses before the model sees it."""


def check_request(body: bytes, allowed_params: set[str]) -> dict:
    """A JSON request body, parsed once: an object holding one of MLflow's input formats and, if
    any, ``params`` the model declares."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"the body is not valid JSON ({str(e)[:200]}); send a JSON object such as "
                           '{"dataframe_split": {"columns": [...], "data": [[...]]}}') from None
    if not isinstance(request, dict):
        raise RequestError(f"the body is a JSON {type(request).__name__}; send an object with one of "
                           f"{', '.join(_FORMATS)} (and optionally params)")
    unknown = sorted(set(request) - {*_FORMATS, "params"})
    if unknown:
        raise RequestError(f"unknown request key(s) {unknown}; a request holds one of {', '.join(_FORMATS)} "
                           "and optionally params")
    formats = [k for k in _FORMATS if k in request]
    if len(formats) != 1:
        raise RequestError(f"a request holds exactly one of {', '.join(_FORMATS)}; this one has "
                           f"{formats or 'none'}")
    params = request.get("params")
    if params is not None:
        if not isinstance(params, dict):
            raise RequestError(f"params must be an object of parameters, got a {type(params).__name__}")
        bad = sorted(set(params) - allowed_params)
        if bad:
            raise RequestError(f"unknown parameter(s) {bad}; this model takes {', '.join(sorted(allowed_params))}")
    return request


def clean_message(message: str) -> str:
    """MLflow's error text without the echo of the request's data it puts in front, and short."""
    message = re.sub(r"^Failed to predict data .*?\nError: ", "", message, flags=re.DOTALL)
    return message if len(message) <= _MAX_MESSAGE else message[:_MAX_MESSAGE] + " ..."


def build_app(model):
    """MLflow's scoring app for a loaded pyfunc ``model`` (``/ping``, ``/health``, ``/version``),
    its ``/invocations`` checked as above."""
    import asyncio

    from fastapi import Request
    from fastapi.responses import Response
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
    from mlflow.pyfunc import scoring_server

    app = scoring_server.init(model)
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != "/invocations"]
    schema = model.metadata.get_params_schema()
    allowed = {p.name for p in schema.params} if schema else set()
    input_schema = model.metadata.get_input_schema()

    def error(e: MlflowException) -> Response:
        body = {"error_code": e.error_code, "message": clean_message(e.message)}
        return Response(content=json.dumps(body), status_code=e.get_http_status_code(), media_type="application/json")

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:  # evaluated annotations: FastAPI reads them
        body = await request.body()
        content_type = request.headers.get("content-type") or ""
        data = body
        try:
            if content_type.split(";")[0].strip().lower() == "application/json":
                data = check_request(body, allowed)  # MLflow takes the parsed object as it is
            result = await asyncio.to_thread(scoring_server.invocations, data, content_type, model, input_schema)
        except RequestError as e:
            return error(MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE))
        except MlflowException as e:
            if getattr(e, "stack_trace", None):  # a failure of the model code: for the server's log only
                _log.error("request failed: %s\n%s", e.message, e.stack_trace)
            return error(e)
        return Response(content=result.response, status_code=result.status, media_type=result.mimetype)

    return app


def serve(model_uri: str, tracking_uri: str, host: str, port: int) -> None:
    """Load the registered model once and serve it until interrupted."""
    import os

    import mlflow
    import uvicorn

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(model_uri)
    uvicorn.run(build_app(model), host=host, port=port, log_level="warning")
