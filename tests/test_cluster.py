"""orchestrator/cluster.py: the one place that reaches into Ray's private token-authentication
module, checked here so that a Ray upgrade that moves it fails loudly instead of hiding the
dashboard's sign-in notice."""

from __future__ import annotations

from cbpo_orch.orchestrator import cluster


def test_rays_token_authentication_check_is_where_cluster_py_reads_it():
    from ray._private.authentication.authentication_utils import is_token_auth_enabled  # moved? update cluster._token_auth

    assert callable(is_token_auth_enabled)


def test_the_dashboard_notice_says_where_the_token_comes_from_when_the_cluster_checks_one(monkeypatch):
    monkeypatch.setattr(cluster, "_token_auth", lambda: True)
    assert cluster.dashboard_notice("127.0.0.1:8265") == "Ray dashboard: http://127.0.0.1:8265 (token authentication: sign in with the token `ray get-auth-token` prints)"
    monkeypatch.setattr(cluster, "_token_auth", lambda: False)
    assert cluster.dashboard_notice("127.0.0.1:8265") == "Ray dashboard: http://127.0.0.1:8265"
