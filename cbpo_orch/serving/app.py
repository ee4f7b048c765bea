"""The Ray Serve application that serves a job: every user's adapter behind one endpoint.

Two deployments:

- ``Ingress`` (FastAPI, no CPU of its own, one replica): the OpenAI routes. It checks the
  key, the body, the user (404 unknown, 409 without a current version) and the prompt's
  budget, then calls the adapter server with the user's current version, whose
  :attr:`~cbpo_orch.serving.catalog.UserAdapterEntry.model_id` is Serve's *multiplexed model
  id*, so the request is routed to a replica that already holds that version. What is
  current is handed to it by the follower (``follow.py``) while it runs.
- ``AdapterServer`` (``replicas`` of them): the job's starting model and a
  :class:`BatchedGenerator`. ``serve.multiplexed`` keeps an LRU of at most
  ``max_adapters_per_replica`` adapter versions per replica (a replaced version is never
  asked for again, and ages out); its own ``StepBatcher``
  (``batcher.py``, the engine loop of vLLM and Ray Serve LLM) gathers the requests that
  arrive together, whoever their users are, into one batched generate whose steps stream
  back to each request. (Serve's ``serve.batch`` would split a batch by multiplexed model id,
  one user a batch.)

Both are defined here, at module level, with the settings that never change; :func:`build_app`
applies a job's :class:`ServeOptions` with ``.options()`` when it binds them, so tools and
tests can read the deployments without a running Ray. No ``from __future__ import
annotations`` here: FastAPI reads the routes' annotations when it builds the ingress.
"""

import asyncio
import ipaddress
import logging
from dataclasses import dataclass, replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from cbpo_orch.data.records import Query
from cbpo_orch.serving.batcher import StepBatcher
from cbpo_orch.serving.catalog import Catalog, UnknownUser, UserAdapterEntry, UserNotReady
from cbpo_orch.serving.generator import BatchedGenerator, Row, load_user_adapter
from cbpo_orch.serving.keys import ApiKeys
from cbpo_orch.serving.openai_api import SSE_DONE, ApiError, completion_body, models_body, new_completion_id, parse_completion_request, sse_event
from cbpo_orch.training.encoding import BudgetError, prompt_ids
from cbpo_orch.training.generation import Completion

LOOPBACK_NAMES = ("localhost",)
LOG = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class ServeOptions:
    """How the application is laid out; none of it changes an answer."""

    replicas: int = 1
    max_adapters_per_replica: int = 32
    max_batch_size: int = 16
    batch_wait_s: float = 0.02
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0

    def __post_init__(self) -> None:
        from cbpo_orch.method.config import require

        require([
            (self.replicas >= 1, "replicas must be ≥ 1"),
            (self.max_adapters_per_replica >= 1, "max-adapters-per-replica must be ≥ 1"),
            (self.max_batch_size >= 1, "max-batch-size must be ≥ 1 (1: no cross-user batching)"),
            (self.batch_wait_s >= 0, "batch-wait-ms must be ≥ 0"),
            (self.cpus_per_replica > 0 and self.gpus_per_replica >= 0, "cpus-per-replica must be > 0 and gpus-per-replica ≥ 0"),
        ])


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def app_name(catalog: Catalog) -> str:
    return f"cbpo-orch-{catalog.job_id}"


def adapter_server_options(options: ServeOptions) -> dict:
    """What ``options`` sets on ``AdapterServer``'s deployment (``.options()`` at bind time)."""
    return {
        "num_replicas": options.replicas,
        "ray_actor_options": {"num_cpus": options.cpus_per_replica, "num_gpus": options.gpus_per_replica},
        "max_ongoing_requests": max(64, 4 * options.max_batch_size),
    }


def build_app(catalog: Catalog, keys: ApiKeys | None, options: ServeOptions):
    """The bound application: ``Ingress`` in front of ``AdapterServer``, laid out as ``options`` says."""
    server = AdapterServer.options(**adapter_server_options(options)).bind(replace(catalog, users={}), options)
    return Ingress.bind(server, catalog, keys)


def start(catalog: Catalog, keys: ApiKeys | None, options: ServeOptions, host: str, port: int, address: str | None) -> str | None:
    """Deploy the application on the Ray at ``address`` (none: a local Ray of its own, as
    ``submit``), its HTTP proxy on ``host:port``; returns the Ray dashboard's address. It
    returns once every replica has loaded the model and answers."""
    from ray import serve

    from cbpo_orch.orchestrator.cluster import connect

    dashboard = connect(address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(catalog, keys, options), name=app_name(catalog), route_prefix="/")
    return dashboard


class RunningIngress:
    """The deployed application's ingress, as the follower talks to it (``follow.py``)."""

    def __init__(self, catalog: Catalog):
        from ray import serve

        self.handle = serve.get_app_handle(app_name(catalog))

    def following(self) -> int:
        return self.handle.following.remote().result()

    def follow(self, users: dict[str, UserAdapterEntry], keys: ApiKeys | None, stamp: int) -> None:
        self.handle.follow.remote(users, keys, stamp).result()


def stop(catalog: Catalog) -> None:
    """Remove this job's application (and no other) and leave Ray."""
    import ray
    from ray import serve

    serve.delete(app_name(catalog))
    ray.shutdown()


async def _events(chunks, completion_id: str, model: str):
    """A streamed completion as server-sent events, ``[DONE]`` last."""
    async for chunk in chunks:
        if chunk.text or chunk.completion is not None:
            yield sse_event(completion_id, model, chunk)
    yield SSE_DONE


def _error(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


@serve.deployment
class AdapterServer:
    """The starting model, its adapter slots, and the adapter versions it holds. It
    reads no user list: each request brings its version's entry."""

    def __init__(self, catalog: Catalog, options: ServeOptions):
        import torch

        from cbpo_orch.training.task_adapter import starting_model

        torch.set_num_threads(max(1, int(options.cpus_per_replica)))
        self.catalog = catalog
        self.entries: dict[str, UserAdapterEntry] = {}  # model id → its version, as requests brought them
        self.device = "cuda" if options.gpus_per_replica > 0 else "cpu"
        loaded = starting_model(catalog.model_path, catalog.task_adapter, self.device)
        self.generator = BatchedGenerator(loaded, catalog.lora, options.max_batch_size, catalog.task.decoding)
        self._stats = {"batches": 0, "rows": 0, "most_users": 0}
        self.batcher = StepBatcher(self._run_batch, options.max_batch_size, options.batch_wait_s)

        async def load(model_id: str):
            entry = self.entries[model_id]
            return await asyncio.to_thread(load_user_adapter, entry.user_id, entry.adapter_path, catalog.lora, self.device)

        # the LRU of loaded versions, as long as this job's options say (a function, as
        # ``serve.multiplexed`` keeps its cache on what it wraps)
        self.adapter = serve.multiplexed(max_num_models_per_replica=options.max_adapters_per_replica)(load)

    async def stream(self, row: Row, entry: UserAdapterEntry | None):
        """The row's chunks, step by step, on ``entry``'s adapter version (None: the base
        model), the one the request started with, whatever became current since."""
        if entry is not None:
            self.entries[entry.model_id] = entry
            row = replace(row, adapter=await self.adapter(entry.model_id))
        async for chunk in self.batcher.stream(row):
            yield chunk

    def stats(self) -> dict:
        """Batches run so far, their rows, and the most users one batch held."""
        return dict(self._stats)

    async def complete(self, row: Row, entry: UserAdapterEntry | None) -> Completion:
        async for chunk in self.stream(row, entry):
            if chunk.completion is not None:
                return chunk.completion
        raise RuntimeError("the generation ended without a completion")

    def _run_batch(self, rows: list[Row], on_step) -> None:
        """One batch of any users' rows in one generate (the batcher's thread)."""
        users = {row.adapter.user_id if row.adapter else None for row in rows}
        self._stats = {"batches": self._stats["batches"] + 1, "rows": self._stats["rows"] + len(rows), "most_users": max(self._stats["most_users"], len(users))}
        self.generator.generate(rows, on_step)


api = FastAPI(title="cbpo-orch", description="Every user's adapter of one cbpo-orch job, OpenAI-compatible.")


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(api)
class Ingress:
    """The OpenAI routes: keys, checks, and routing by user. One replica: the follower's
    readings reach it."""

    def __init__(self, server, catalog: Catalog, keys: ApiKeys | None):
        from cbpo_orch.training.models import load_tokenizer

        self.server, self.catalog, self.keys = server, catalog, keys
        self.stamp = 0
        self.tokenizer = load_tokenizer(catalog.model_path)
        self.retrieval = None
        if catalog.retrieval is not None:
            from cbpo_orch.serving.retrieval import served_context

            self.retrieval = served_context(catalog.retrieval, catalog.task, self.tokenizer, catalog.model_path)

    async def follow(self, users: dict[str, UserAdapterEntry], keys: ApiKeys | None, stamp: int) -> None:
        """Answer new requests with ``users`` and ``keys`` (the follower's reading
        ``stamp``); requests in flight keep the versions they started with."""
        self.catalog, self.keys, self.stamp = replace(self.catalog, users=users), keys, stamp

    async def following(self) -> int:
        return self.stamp

    @api.get("/v1/models")
    async def models(self, request: Request):
        users = self.catalog.servable
        if self.keys is not None:
            users = self.keys.visible(request.headers.get("authorization"), users)
            if users is None:
                return _error(ApiError(401, "a valid API key is required: send `Authorization: Bearer KEY`"))
        return models_body(self.catalog.base_name, [self.catalog.users[user] for user in users], f"cbpo-orch job {self.catalog.job_id} ({self.catalog.method})")

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        try:
            entry, parsed, row = self._checked(request.headers.get("authorization"), await request.body())
            handle = self.server.options(multiplexed_model_id=entry.model_id) if entry else self.server
            completion_id = new_completion_id()
            if parsed.stream:
                chunks = handle.options(stream=True).stream.remote(row, entry)
                return StreamingResponse(_events(chunks, completion_id, parsed.model), media_type="text/event-stream")
            return completion_body(completion_id, parsed.model, await handle.complete.remote(row, entry))
        except ApiError as error:
            return _error(error)
        except Exception as error:  # the server answers, whatever failed
            LOG.exception("completion failed")
            return _error(ApiError(500, f"the completion failed: {type(error).__name__}"))

    def _checked(self, authorization: str | None, body: bytes):
        """(the user's current version or None for the base model, the request, its row)
        or ApiError; one step of the event loop, so one reading of the follower's."""
        if self.keys is not None and not (known := self.keys.access(authorization, None)).allowed:
            raise ApiError(known.status, known.message)
        parsed = parse_completion_request(body, self.catalog.budgets.new_tokens)
        user = None if parsed.model == self.catalog.base_name else parsed.model
        if self.keys is not None and not (access := self.keys.access(authorization, user)).allowed:
            raise ApiError(access.status, access.message, "model")
        entry = None
        if user is not None:
            try:
                entry = self.catalog.adapter(user)
            except UnknownUser as error:
                raise ApiError(404, f"{error}: `model` must be one of GET /v1/models", "model") from None
            except UserNotReady as error:
                raise ApiError(409, str(error), "model") from None
        prompt = self.catalog.task.prompt(Query(id="request", input=parsed.prompt, gold=None))
        if user is not None and self.retrieval is not None:
            prompt = self._retrieved_prompt(user, prompt)
        try:
            ids = prompt_ids(self.tokenizer, prompt, self.catalog.budgets.prompt_tokens)
        except BudgetError as error:
            raise ApiError(400, str(error), "prompt") from None
        return entry, parsed, Row(ids, parsed.max_tokens, None, parsed.temperature, parsed.top_p)

    def _retrieved_prompt(self, user: str, prompt: str) -> str:
        """The user's prompt after its retrieved items, from the data ``serve`` started
        with (409 for a user that data does not hold: added by a later update)."""
        from cbpo_orch.workers.prompts import served_prompt

        if user not in self.retrieval.dataset.users:
            raise ApiError(409, f"user {user!r} is not in the data this --retrieve server read its items from when it started: restart `serve` to answer it", "model")
        return served_prompt(self.retrieval, user, prompt, self.catalog.retrieval.config, self.catalog.budgets)
