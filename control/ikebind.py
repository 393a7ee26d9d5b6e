"""Bind the checked daemon config to the IKEv2 core's configuration.

The core knows profiles and two callbacks for addresses; this module maps
``[[profiles]]`` tables onto :class:`control.ike.profiles.Profile` (loading
certificate, key, CA and CRL files into credentials and trust stores, and
``match_certificate`` rules into certificate maps) and routes each address
request to the pool of the profile the core chose for the session.
"""

from __future__ import annotations

import ipaddress

from control.aaa.radius import RadiusClient, RadiusServer
from control.config import Config, ProfileConfig
from control.ike import certs
from control.ike.cookies import GuardConfig
from control.ike.matching import CertRule
from control.ike.messages import EncrId
from control.ike.profiles import (
    WINDOWS_DH_GROUPS,
    EspAlgorithms,
    Identity,
    Profile,
    ResponderConfig,
    default_dh_groups,
    default_ike_proposals,
    windows_ike_proposals,
)
from control.pool import AddressPool, find_pool

_ESP = {
    "aes128gcm16": EspAlgorithms(EncrId.ENCR_AES_GCM_16, 128),
    "aes256gcm16": EspAlgorithms(EncrId.ENCR_AES_GCM_16, 256),
}


def build_responder_config(
    config: Config, pools: dict[str, AddressPool]
) -> ResponderConfig:
    """Return the core's configuration for ``config``, drawing on ``pools``."""
    profiles = [
        Profile(
            name=p.name,
            remote_ids=list(p.match_identity),
            local_id=Identity.from_string(p.local_identity),
            psk=p.psk,
            esp_proposals=[_ESP[name] for name in p.esp],
            local_ts=list(p.local_ts),
            dns=list(p.dns),
            local_auth=p.local_auth,
            remote_auth=list(p.remote_auth),
            credential=_credential(p),
            trust=_trust(p),
            cert_map=[CertRule(*rule) for rule in p.match_certificate],
            ike_rekey_time=float(p.ike_rekey_time) or None,
            child_rekey_time=float(p.child_rekey_time) or None,
            session_lifetime=float(p.session_lifetime) or None,
            config_mode=p.config_mode,
            **_proposals(p),
            flow_limit=p.flow_limit,
            dpd_delay=float(p.dpd_delay) or None,
            dpd_timeout=float(p.dpd_timeout),
            eap_query_identity=p.eap_query_identity,
            eap_timeout=float(p.eap_timeout),
            aaa_psk=p.aaa_psk is not None,
            authorize=bool(p.authorization_user or p.authorization_group),
            dhcp=p.pool is None and p.dhcp_server is not None,
            cisco_attributes=dict(p.cisco_attributes),
        )
        for p in config.profiles
    ]
    pool_of = {p.name: p.pool for p in config.profiles}

    def allocate(identity: str, session_id: str) -> ipaddress.IPv4Address | None:
        ident = Identity.from_string(identity)
        for profile in profiles:
            if profile.admits(ident):
                return _allocate4(pools, pool_of[profile.name], session_id, identity)
        return None

    def allocate_in(
        profile: str, identity: str, session_id: str
    ) -> ipaddress.IPv4Address | None:
        return _allocate4(pools, pool_of[profile], session_id, identity)

    pool6_of = {p.name: p.ipv6_pool for p in config.profiles}

    def allocate6(
        profile: str, chosen: str | None, session_id: str
    ) -> ipaddress.IPv6Interface | None:
        # the pool authorization named, else the profile's
        name = chosen or pool6_of[profile]
        pool = find_pool(pools, name, 6) if name else None
        if pool is None:
            return None
        address = pool.allocate(session_id)
        if address is None:
            return None
        return ipaddress.IPv6Interface(f"{address}/{pool.client_prefix}")

    def release(address: ipaddress.IPv4Address) -> None:
        for pool in pools.values():
            if pool.release(address):
                return

    return ResponderConfig(
        profiles=profiles,
        allocate_address=allocate,
        release_address=release,
        allocate_in_profile=allocate_in,
        allocate_from_pool=lambda name, session_id: _allocate4(
            pools, name, session_id, ""
        ),
        allocate_address6=allocate6,
        guard=GuardConfig(
            cookie_threshold=config.server.cookie_threshold,
            per_source=config.server.half_open_per_source,
        ),
        fragment_size=config.server.fragment_size,
    )


def _proposals(p: ProfileConfig) -> dict[str, list]:
    """Return the IKE sets and groups of a profile; Windows ones when enabled."""
    ike, groups = default_ike_proposals(), default_dh_groups()
    if p.windows_proposals:
        ike += windows_ike_proposals()
        groups += [g for g in WINDOWS_DH_GROUPS if g not in groups]
    return {"ike_proposals": ike, "dh_groups": groups}


def _allocate4(
    pools: dict[str, AddressPool], name: str | None, session_id: str, identity: str
) -> ipaddress.IPv4Address | None:
    pool = find_pool(pools, name, 4) if name else None
    if pool is None:
        return None
    address = pool.allocate(session_id, identity)
    assert address is None or isinstance(address, ipaddress.IPv4Address)
    return address


def build_radius_clients(config: Config) -> dict[str, RadiusClient]:
    """Return one RADIUS client per ``[radius.NAME]`` group, by name."""
    return {
        name: RadiusClient(
            name,
            [RadiusServer(s.address, s.port, s.secret) for s in group.servers],
            timeout=group.timeout,
            retransmit=group.retransmit,
            nas_identifier=group.nas_identifier,
            user_password=group.user_password,
        )
        for name, group in config.radius.items()
    }


def _credential(p: ProfileConfig) -> certs.Credential | None:
    if p.local_auth == "pre-share":
        return None
    assert p.certificate and p.private_key, "config checked the credential files"
    return certs.Credential(
        certs.load_private_key(p.private_key), certs.load_certificates(p.certificate)
    )


def _trust(p: ProfileConfig) -> certs.TrustStore | None:
    if not p.ca:
        return None
    anchors = [c for path in p.ca for c in certs.load_certificates(path)]
    crls = [c for path in p.crl for c in certs.load_crls(path)]
    return certs.TrustStore(anchors, crls)
