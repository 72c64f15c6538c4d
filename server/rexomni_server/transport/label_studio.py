"""Label Studio ML backend over HTTP, under ``/label-studio``: the routes Label Studio's
``MLApi`` calls (health, setup, predict, webhook/train) and the image downloads they need.

Connect a project with *Settings -> Model -> Connect model*, URL ``http://HOST:8000/label-studio``.
The label config decides what is asked (see ``rexomni_server.label_studio``). Every task of a
``/predict`` call is one request per job to the detection service (logged and counted with
transport ``label-studio``, its id ``<call's request id>-<task index>[.<job index>]``), several
at a time; the answer has one prediction per task, in the order of the tasks.

Failures: a task whose image cannot be had (a dead URL, not an image, too large) gets an
empty prediction with an ``error`` (Label Studio pairs predictions with tasks by position and
drops a whole answer with a malformed one); when every task failed so, the call fails instead
with that error's status, so Label Studio stores nothing and asks again later. A full queue or
a dead engine fails the whole call (429 / 503, as everywhere), the other tasks cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from rexomni_server import __version__
from rexomni_server.errors import ImageTooLarge, InvalidImage, InvalidRequest
from rexomni_server.label_studio import (
    HealthResponse,
    ImageLocation,
    ImageSource,
    Job,
    LabelConfig,
    LabelStudioTask,
    Prediction,
    PredictRequest,
    PredictResponse,
    SetupRequest,
    SetupResponse,
    ValidateRequest,
    ValidateResponse,
    WebhookResponse,
    describe_url,
    failed_prediction,
    is_personal_access_token,
    jwt_expiry,
    locate_image,
    parse_label_config,
    printable,
    project_id,
    to_prediction,
)
from rexomni_server.runtime import Runtime
from rexomni_server.schemas import DetectResult
from rexomni_server.service import DetectionService, EncodedImage
from rexomni_server.settings import Settings
from rexomni_server.transport.http import (
    ERROR_RESPONSES,
    request_id_of,
    runtime_of,
    while_connected,
)

PREFIX = "/label-studio"
TRANSPORT = "label-studio"  # the transport label of its requests' records, logs and metrics
IMAGE_FETCH_TIMEOUT_S = 30.0  # one image download, redirects included
MAX_REDIRECTS = 5
# Tasks of one call predicted at once; fewer when its requests would take more than half of
# max_queue (a large Data Manager batch must not refuse itself, nor starve other clients).
MAX_CONCURRENT_TASKS = 16
PROJECTS_KEPT = 1024  # setups remembered (least recently used dropped)
TOKEN_REFRESH_MARGIN_S = 30.0  # an access token is renewed this long before it expires
UNKNOWN_EXPIRY_S = 240.0  # kept this long when an access token does not say when it expires
USER_AGENT = f"rexomni-server/{__version__}"
# A download's failures: the network, the protocol, and URLs httpx cannot use (a bad host name).
FETCH_ERRORS = (httpx.HTTPError, httpx.InvalidURL, ValueError)

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class ProjectSetup:
    """What Label Studio's last /setup for a project said."""

    hostname: str
    access_token: str
    label_config: str


@dataclass(frozen=True)
class LabelStudioAccess:
    """How to reach Label Studio for its stored images: its base URL and a token ("" if none)."""

    base_url: str
    token: str


def _http_url(url: str | None) -> str:
    url = (url or "").strip()
    return url.rstrip("/") if url.startswith(("http://", "https://")) else ""


class LabelStudioBackend:
    """The routes' state: what each project's /setup said, and access tokens exchanged for
    personal access tokens (until they expire)."""

    def __init__(self) -> None:
        self._projects: OrderedDict[str, ProjectSetup] = OrderedDict()
        self._access_tokens: dict[tuple[str, str], tuple[str, float]] = {}
        self._refresh_lock = asyncio.Lock()

    def remember(self, project: str | None, setup: ProjectSetup) -> None:
        if project is None:
            return
        self._projects[project] = setup
        self._projects.move_to_end(project)
        while len(self._projects) > PROJECTS_KEPT:
            self._projects.popitem(last=False)

    def project(self, project: str | None) -> ProjectSetup | None:
        return self._projects.get(project) if project is not None else None

    @staticmethod
    def access(settings: Settings, setup: ProjectSetup | None) -> LabelStudioAccess:
        """The server's settings first; else what Label Studio sent at setup."""
        base = _http_url(settings.label_studio_url) or _http_url(setup.hostname if setup else None)
        token = settings.label_studio_api_key.get_secret_value().strip() or (setup.access_token if setup else "")
        return LabelStudioAccess(base, token.strip())

    async def authorization(self, client: httpx.AsyncClient, access: LabelStudioAccess) -> str | None:
        """The Authorization header for Label Studio: ``Token KEY`` for a legacy token, ``Bearer
        ACCESS`` for a personal access token (exchanged at /api/token/refresh/ and kept until it
        nearly expires)."""
        if not access.token:
            return None
        if not is_personal_access_token(access.token):
            return f"Token {access.token}"
        key = (access.base_url, access.token)
        async with self._refresh_lock:
            cached = self._access_tokens.get(key)
            if cached is None or cached[1] <= time.time():
                cached = await self._refresh(client, access)
                self._access_tokens[key] = cached
        return f"Bearer {cached[0]}"

    async def _refresh(self, client: httpx.AsyncClient, access: LabelStudioAccess) -> tuple[str, float]:
        url = f"{access.base_url}/api/token/refresh/"
        try:
            response = await client.post(url, json={"refresh": access.token}, timeout=IMAGE_FETCH_TIMEOUT_S)
        except FETCH_ERRORS as exc:
            raise InvalidImage(f"Label Studio's token endpoint {url} could not be reached: {_reason(exc)}") from None
        token = _access_token(response)
        if response.status_code != 200 or token is None:
            raise InvalidImage(
                f"Label Studio refused the personal access token (HTTP {response.status_code} from {url}): "
                "check REXOMNI_LABEL_STUDIO_API_KEY"
            )
        expiry = jwt_expiry(token) or time.time() + UNKNOWN_EXPIRY_S
        return token, expiry - TOKEN_REFRESH_MARGIN_S


def _access_token(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    token = body.get("access") if isinstance(body, dict) else None
    return token if isinstance(token, str) and token else None


def _reason(exc: BaseException) -> str:
    return printable(exc) or type(exc).__name__


@dataclass
class ImageFetcher:
    """Downloads the images of one /predict call (one connection pool for all its tasks)."""

    client: httpx.AsyncClient
    backend: LabelStudioBackend
    access: LabelStudioAccess
    max_bytes: int

    async def image(self, task: LabelStudioTask, source: ImageSource) -> EncodedImage:
        """The task's image for an ``<Image>``: a data URI as it is (the service decodes it), or
        the downloaded bytes. Raises InvalidImage (or ImageTooLarge)."""
        located = locate_image(source.reference(task), task.id, self.access.base_url)
        if isinstance(located, str):
            return located
        authorization = await self.backend.authorization(self.client, self.access) if located.label_studio else None
        try:
            async with asyncio.timeout(IMAGE_FETCH_TIMEOUT_S):
                return await self._download(located, authorization)
        except TimeoutError:
            raise InvalidImage(
                f"the image {located.described()} did not arrive within {IMAGE_FETCH_TIMEOUT_S:g} s"
            ) from None
        except FETCH_ERRORS as exc:
            raise InvalidImage(f"the image {located.described()} could not be fetched: {_reason(exc)}") from None

    async def _download(self, located: ImageLocation, authorization: str | None) -> bytes:
        headers = {"Authorization": authorization} if authorization else {}
        status, data = await self._get(located.url, headers)
        if status == 404 and located.fallback is not None:
            status, data = await self._get(located.fallback, headers)
        if status == 200:
            return data
        message = f"fetching the image {located.described()} answered HTTP {status}"
        if located.label_studio and status in (401, 403):
            message += (
                ": Label Studio refused the token; set REXOMNI_LABEL_STUDIO_API_KEY to a valid access token "
                "(a personal access token where legacy tokens are disabled)"
                if authorization
                else ": Label Studio needs a token; set REXOMNI_LABEL_STUDIO_API_KEY"
            )
        raise InvalidImage(message)

    async def _get(self, url: str, headers: dict[str, str]) -> tuple[int, bytes]:
        """(status, body); the body read only for a 200, and never past max_bytes (counted as it
        arrives, after any content decoding, so a compressed bomb is refused too)."""
        async with self.client.stream("GET", url, headers=headers) as response:
            if response.status_code != 200:
                return response.status_code, b""
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) > self.max_bytes:
                raise ImageTooLarge(f"the image {describe_url(url)} is {length} bytes; the limit is {self.max_bytes}")
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > self.max_bytes:
                    raise ImageTooLarge(
                        f"the image {describe_url(url)} is larger than the limit of {self.max_bytes} bytes"
                    )
            return 200, bytes(data)


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


async def all_or_first_error(work: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Runs the coroutines concurrently; the first to raise cancels the others and its error
    is raised (not wrapped in an exception group)."""
    tasks: list[asyncio.Task[T]] = []
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(coroutine) for coroutine in work]
    except BaseExceptionGroup as errors:
        raise _first_error(errors) from None
    return [task.result() for task in tasks]


def _record_refusal(
    service: DetectionService, request_id: str, job: Job, task: LabelStudioTask, exc: InvalidRequest
) -> None:
    """A job that never reached the service (its image could not be had), logged and counted
    like any refused request."""
    with service.ledger.scope(request_id, TRANSPORT) as record:
        record.task = job.params.task.value
        record.fields["label_studio_task"] = task.id
        record.fail(exc.code)


async def _run_job(
    service: DetectionService, job: Job, image: EncodedImage, request_id: str, task: LabelStudioTask
) -> DetectResult:
    with service.ledger.scope(request_id, TRANSPORT) as record:
        record.fields["label_studio_task"] = task.id
        return await service.detect(job.params, image, record=record)


@dataclass(frozen=True)
class TaskOutcome:
    prediction: Prediction
    error: InvalidRequest | None = None  # why the prediction is empty


async def predict_task(
    service: DetectionService,
    fetcher: ImageFetcher,
    config: LabelConfig,
    task: LabelStudioTask,
    request_id: str,
    model_version: str,
) -> TaskOutcome:
    """One task: its images fetched, its jobs run concurrently, their regions in one prediction.
    The task's own bad input (an image that cannot be had or used) makes an empty prediction;
    anything else (a full queue, a dead engine) is raised and fails the call."""
    jobs = config.jobs
    ids = [request_id if len(jobs) == 1 else f"{request_id}.{index}" for index in range(len(jobs))]
    try:
        try:
            images = {source: await fetcher.image(task, source) for source in config.images}
        except InvalidRequest as exc:
            for job, job_id in zip(jobs, ids, strict=True):
                _record_refusal(service, job_id, job, task, exc)
            raise
        results = await all_or_first_error(
            _run_job(service, job, images[job.image], job_id, task) for job, job_id in zip(jobs, ids, strict=True)
        )
    except InvalidRequest as exc:
        log.info(
            "label studio task not predicted",
            extra={"fields": {"request_id": request_id, "label_studio_task": task.id, "error": exc.message}},
        )
        return TaskOutcome(failed_prediction(model_version, exc.code, exc.message), exc)
    return TaskOutcome(to_prediction(jobs, results, model_version))


def model_version(runtime: Runtime) -> str:
    return runtime.service.model_label


async def predict(
    runtime: Runtime, backend: LabelStudioBackend, body: PredictRequest, request_id: str
) -> PredictResponse:
    """A /predict call: one prediction per task, in their order. Raises the first task's error
    when every task failed, and any error that is not a task's own bad input."""
    setup = backend.project(project_id(body.project))
    xml = body.label_config or (setup.label_config if setup else None)
    if not xml:
        raise InvalidRequest(
            "the request has no label_config and its project was not set up (POST /label-studio/setup)"
        )
    config = parse_label_config(xml)
    version = model_version(runtime)
    if not body.tasks:
        return PredictResponse(results=[], model_version=version)
    settings, service = runtime.settings, runtime.service
    cost = sum(service.engine_requests_for(job.params) for job in config.jobs)
    limit = max(1, min(MAX_CONCURRENT_TASKS, settings.max_queue // (2 * cost)))
    slots = asyncio.Semaphore(limit)
    async with httpx.AsyncClient(
        follow_redirects=True,
        max_redirects=MAX_REDIRECTS,
        timeout=IMAGE_FETCH_TIMEOUT_S,
        headers={"User-Agent": USER_AGENT},
    ) as client:
        fetcher = ImageFetcher(client, backend, backend.access(settings, setup), settings.max_image_bytes)

        async def one(index: int, task: LabelStudioTask) -> TaskOutcome:
            async with slots:
                return await predict_task(service, fetcher, config, task, f"{request_id}-{index}", version)

        outcomes = await all_or_first_error(one(index, task) for index, task in enumerate(body.tasks))
    first_error = outcomes[0].error
    if first_error is not None and all(outcome.error is not None for outcome in outcomes):
        raise first_error
    return PredictResponse(results=[outcome.prediction for outcome in outcomes], model_version=version)


def _json(model: BaseModel, status_code: int = 200) -> JSONResponse:
    """Label Studio's shapes: None fields left out (a prediction without a score, a region
    without a parent), ``parentID`` by its name."""
    return JSONResponse(model.model_dump(mode="json", by_alias=True, exclude_none=True), status_code=status_code)


def label_studio_router() -> APIRouter:
    """The Label Studio ML backend routes (each router keeps its own setups and tokens)."""
    backend = LabelStudioBackend()
    router = APIRouter(prefix=PREFIX, tags=["label-studio"])

    async def health(request: Request) -> JSONResponse:
        """Label Studio's connection check: UP once the model is loaded (503 DOWN before,
        or after the engine failed)."""
        runtime = runtime_of(request)
        if runtime.ready:
            return _json(HealthResponse(status="UP"))
        error = runtime.problem or "the model is still loading"
        return _json(HealthResponse(status="DOWN", error=error), status_code=503)

    router.add_api_route("/health", health, methods=["GET"], response_model=HealthResponse)
    router.add_api_route("/", health, methods=["GET"], response_model=HealthResponse, include_in_schema=False)

    @router.post("/setup", response_model=SetupResponse, responses=ERROR_RESPONSES)
    async def setup(request: Request, body: SetupRequest) -> JSONResponse:
        """Called when a project connects the model (and before its predictions): the label
        config is checked (422 when Rex-Omni can fill none of its control tags) and kept with
        the hostname and token Label Studio sends, for the project's later calls."""
        config = parse_label_config(body.label_config)
        project = project_id(body.project)
        backend.remember(project, ProjectSetup(body.hostname or "", body.access_token or "", body.label_config))
        for warning in config.warnings:
            log.warning("label studio config: %s", warning, extra={"fields": {"project": project}})
        return _json(SetupResponse(model_version=model_version(runtime_of(request)), warnings=list(config.warnings)))

    @router.post("/validate", response_model=ValidateResponse, responses=ERROR_RESPONSES)
    async def validate(body: ValidateRequest) -> JSONResponse:
        """A label config checked as /setup checks it (422 when Rex-Omni can fill none of it)."""
        return _json(ValidateResponse(warnings=list(parse_label_config(body.config).warnings)))

    @router.post("/predict", response_model=PredictResponse, responses=ERROR_RESPONSES)
    async def predict_route(request: Request, body: PredictRequest) -> Response:
        """Predictions for Label Studio tasks: ``{"results": [...]}``, one per task, in order."""
        result = await while_connected(request, predict(runtime_of(request), backend, body, request_id_of(request)))
        return result if isinstance(result, Response) else _json(result)

    async def webhook() -> JSONResponse:
        """Training events (annotations created, START_TRAINING): Rex-Omni is not trained from
        Label Studio, so they are acknowledged and ignored."""
        return _json(WebhookResponse(message="Rex-Omni is not trained from Label Studio; training events are ignored"))

    router.add_api_route("/webhook", webhook, methods=["POST"], response_model=WebhookResponse)
    router.add_api_route("/train", webhook, methods=["POST"], response_model=WebhookResponse)
    return router
