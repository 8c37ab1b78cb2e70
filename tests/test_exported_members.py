"""`broker_serve.__all__` and `serve.__all__` are the contract: sorted, complete and importable."""

import broker_serve
from broker_serve import serve


def test_package_all_is_sorted_and_complete():
    public = {name for name in vars(broker_serve) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(broker_serve, name)).__name__ == "module"}
    assert broker_serve.__all__ == sorted(broker_serve.__all__)
    assert public - modules - set(broker_serve.__all__) == set()
    assert "serve" in broker_serve.__all__


def test_serve_mirrors_ray_serve_names():
    assert serve.__all__ == sorted(serve.__all__)
    for name in serve.__all__:
        assert getattr(serve, name) is not None
    ray_names = {"deployment", "ingress", "run", "start", "status", "delete", "shutdown",
                 "get_replica_context", "get_app_handle", "get_deployment_handle",
                 "Application", "Deployment", "HTTPOptions"}
    assert ray_names <= set(serve.__all__)


def test_serve_has_ray_serve_0_8_names():
    ray08_names = {"init", "create_endpoint", "create_backend", "get_backend_config",
                   "set_backend_config", "link", "split", "get_handle", "stat", "accept_batch",
                   "route", "BackendConfig", "RoutePolicy", "get_deployment", "list_deployments"}
    assert ray08_names <= set(serve.__all__)
    assert serve.context.web is False and serve.handle.RayServeSyncHandle is not None


def test_grpc_util_is_at_rays_path_and_needs_no_grpcio():
    import subprocess
    import sys

    from broker_serve import grpc_util

    assert grpc_util.__all__ == ["RayServegRPCContext"]
    assert grpc_util.RayServegRPCContext is serve.RayServegRPCContext
    # grpcio is an optional extra: the public API must import without it.
    probe = "import sys, broker_serve.serve; assert 'grpc' not in sys.modules, 'grpc imported'"
    subprocess.run([sys.executable, "-c", probe], check=True)
