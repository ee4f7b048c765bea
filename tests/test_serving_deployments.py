"""The serving application's two deployments, read without a running Ray: they are defined at
module level, and a job's ``ServeOptions`` reach ``AdapterServer`` with ``.options()`` at bind time."""

from cbpo_orch.serving.app import AdapterServer, Ingress, ServeOptions, adapter_server_options, api


def test_the_deployments_are_defined_at_module_level_with_their_fixed_settings():
    assert (Ingress.name, AdapterServer.name) == ("Ingress", "AdapterServer")
    assert (Ingress.num_replicas, Ingress.ray_actor_options, Ingress.max_ongoing_requests) == (1, {"num_cpus": 0}, 1000)
    assert set(api.openapi()["paths"]) == {"/v1/models", "/v1/completions"}
    assert all(callable(getattr(Ingress.func_or_class, name)) for name in ("follow", "following"))
    assert all(callable(getattr(AdapterServer.func_or_class, name)) for name in ("stream", "complete", "stats"))


def test_a_jobs_options_lay_out_the_adapter_server_at_bind_time():
    options = ServeOptions(replicas=3, cpus_per_replica=0.5, gpus_per_replica=1.0, max_batch_size=32)
    server = AdapterServer.options(**adapter_server_options(options))
    assert server.name == "AdapterServer"
    assert (server.num_replicas, server.ray_actor_options, server.max_ongoing_requests) == (3, {"num_cpus": 0.5, "num_gpus": 1.0}, 128)
    assert adapter_server_options(ServeOptions(max_batch_size=4))["max_ongoing_requests"] == 64
    assert AdapterServer.num_replicas == 1, "binding a job's options leaves the module's deployment as it is"
