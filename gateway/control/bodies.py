"""
The check every API-registered cluster body passes, wherever it comes from: a
PUT, the state file at start-up, another gateway through the shared store.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.config import ClusterConfig, ConfigError, GatewaySettings, parse_cluster
from gateway.config.schema import api_body_refusal, api_config_refusal
from gateway.store.sealing import SEALED_FIELDS, is_sealed
from gateway.store.statefile import type_name

__all__ = ["validate_body"]


def validate_body(
    name: str,
    body: Mapping[str, Any],
    source: str = "request body",
    known_clusters: Mapping[str, str] | None = None,
    settings: GatewaySettings | None = None,
) -> ClusterConfig:
    """
    Validate the body of a cluster PUT (or one loaded from the store).

    The body has the keys of a C{[clusters.NAME]} table, with no
    C{[defaults]} applied; errors name the body field (C{networks[0]},
    C{key}), C{(body)} when the body is not a JSON object, C{(name)} when the
    name is invalid.

    A body carries its secrets inline (C{key}, C{passphrase}, C{host_keys},
    C{token}).  What would let an API client act with the gateway's own
    rights is refused, naming the key, unless C{settings} (the C{[gateway]}
    table; its defaults when None) allows it: the file keys (then as
    absolute paths; C{api_file_paths}), C{proxy_command}
    (C{api_proxy_command}) and a C{jump} through another cluster's
    connection (C{api_jump}).  Which key is refused how is the C{api} column
    of the key table, L{gateway.config.schema.CLUSTER_SCHEMA}.

    @param known_clusters: the other clusters' names and aliases, each mapped
        to its cluster's name, for C{jump} (see L{parse_cluster}).
    @raise ConfigError: if anything is wrong.
    """
    if not isinstance(body, Mapping):
        raise ConfigError(source, "(body)", f"expected a JSON object, got {type_name(body)}")
    settings = settings or GatewaySettings()
    refused = api_body_refusal(body, settings)
    if refused is not None:
        raise ConfigError(source, *refused)
    for field in SEALED_FIELDS:
        if is_sealed(body.get(field)):
            # Stored as it is without a key, it would stop the next start-up
            # (a sealed value nobody can open): the form is the store's own.
            raise ConfigError(
                source, field, "a value in the store's sealed form is not accepted: send the secret itself"
            )
    try:
        config = parse_cluster(name, body, source, "", known_clusters=known_clusters)
    except ConfigError as e:
        if e.key == "":  # the only error about the table itself: its name
            raise ConfigError(e.source, "(name)", e.reason) from None
        raise
    refused = api_config_refusal(config, settings)
    if refused is not None:
        raise ConfigError(source, *refused)
    return config
