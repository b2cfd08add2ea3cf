"""Build a ``kubernetes`` API client, and find the client's list function for a resource.

``kubernetes`` is imported lazily inside the functions: importing it costs ~225 ms, which
commands that never talk to a cluster (``render``) must not pay.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

from minikproxy import __version__

_SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
_DEFAULT_KUBECONFIG = Path("~/.kube/config")

# (group path, plural) -> (client API class, list-for-all-namespaces method)
_LIST_METHODS: dict[tuple[str, str], tuple[str, str]] = {
    ("/api/v1", "services"): ("CoreV1Api", "list_service_for_all_namespaces"),
    ("/api/v1", "endpoints"): ("CoreV1Api", "list_endpoints_for_all_namespaces"),
    ("/api/v1", "nodes"): ("CoreV1Api", "list_node"),
    ("/apis/discovery.k8s.io/v1", "endpointslices"): (
        "DiscoveryV1Api",
        "list_endpoint_slice_for_all_namespaces",
    ),
    ("/apis/networking.k8s.io/v1", "servicecidrs"): ("NetworkingV1Api", "list_service_cidr"),
}

# group version path -> the client API class whose get_api_resources reads its discovery document
_GROUP_APIS = {
    "/api/v1": "CoreV1Api",
    "/apis/discovery.k8s.io/v1": "DiscoveryV1Api",
    "/apis/networking.k8s.io/v1": "NetworkingV1Api",
}


class KubeConfigError(Exception):
    """No usable cluster configuration; the message says what was tried."""


def _in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and _SERVICE_ACCOUNT_TOKEN.is_file()


def load_api_client(kubeconfig: str | None) -> ApiClient:
    """Return an API client configured from, in order of preference:

    an explicit ``kubeconfig`` path; the in-cluster service account (``KUBERNETES_SERVICE_HOST``
    and a mounted token); ``$KUBECONFIG`` (a ``:``-separated list is merged); ``~/.kube/config``.
    Raise :class:`KubeConfigError` if none is usable.
    """
    from kubernetes import client
    from kubernetes import config as kube_config
    from kubernetes.config.config_exception import ConfigException

    config: Any = kube_config  # its loaders are untyped

    cfg = client.Configuration()
    try:
        if kubeconfig:
            if not Path(kubeconfig).expanduser().is_file():
                raise KubeConfigError(f"kubeconfig {kubeconfig}: no such file")
            config.load_kube_config(
                config_file=str(Path(kubeconfig).expanduser()), client_configuration=cfg
            )
        elif _in_cluster():
            config.load_incluster_config(client_configuration=cfg)
        elif os.environ.get("KUBECONFIG"):
            config.load_kube_config(config_file=os.environ["KUBECONFIG"], client_configuration=cfg)
        elif _DEFAULT_KUBECONFIG.expanduser().is_file():
            config.load_kube_config(
                config_file=str(_DEFAULT_KUBECONFIG.expanduser()), client_configuration=cfg
            )
        else:
            raise KubeConfigError(
                "no cluster configuration: pass --kubeconfig, run in a pod with a service "
                "account, set $KUBECONFIG, or create ~/.kube/config"
            )
    except ConfigException as err:
        raise KubeConfigError(f"invalid cluster configuration: {err}") from None
    api = client.ApiClient(cfg)
    api.user_agent = f"minikproxy/{__version__}"
    return api


def list_function(api_client: ApiClient, group_path: str, plural: str) -> Callable[..., Any]:
    """The generated client's cluster-wide list/watch method for ``group_path``/``plural``.

    Raise :class:`ValueError` for a resource minikproxy does not watch.
    """
    try:
        api_class, method = _LIST_METHODS[(group_path, plural)]
    except KeyError:
        known = ", ".join(f"{g}/{p}" for g, p in sorted(_LIST_METHODS))
        raise ValueError(f"unsupported resource {group_path}/{plural} (known: {known})") from None
    from kubernetes import client

    fn: Callable[..., Any] = getattr(getattr(client, api_class)(api_client), method)
    return fn


def api_resources(
    api_client: ApiClient, group_path: str, timeout: tuple[float, float] = (10.0, 60.0)
) -> dict[str, Any] | None:
    """The discovery document (``APIResourceList``) of a group version, as raw JSON, or None
    when the API server does not serve that group version (404). Other failures raise the
    client's exception; ``timeout`` is (connect, read) seconds."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        api_class = _GROUP_APIS[group_path]
    except KeyError:
        raise ValueError(f"unsupported group version {group_path}") from None
    api = getattr(client, api_class)(api_client)
    try:
        resp = api.get_api_resources(_preload_content=False, _request_timeout=timeout)
    except ApiException as err:
        if err.status == 404:
            return None
        raise
    try:
        body = json.loads(resp.read())
    finally:
        resp.release_conn()
    if not isinstance(body, dict):
        raise ValueError(f"{group_path}: the discovery document is not a JSON object")
    return body
