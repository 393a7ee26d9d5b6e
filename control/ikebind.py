"""Bind the checked daemon config to the IKEv2 core's configuration.

The core knows profiles and two callbacks for addresses; this module maps
``[[profiles]]`` tables onto :class:`control.ike.profiles.Profile` (loading
certificate, key, CA and CRL files into credentials and trust stores, and
``match_certificate`` rules into certificate maps) and routes each address
request to the pool of the profile the core chose for the session.
"""

from __future__ import annotations

import ipaddress

from control.config import Config, ProfileConfig
from control.ike import certs
from control.ike.matching import CertRule
from control.ike.messages import EncrId
from control.ike.profiles import EspAlgorithms, Identity, Profile, ResponderConfig
from control.pool import AddressPool

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
        )
        for p in config.profiles
    ]
    pool_of = {p.name: p.pool for p in config.profiles}

    def allocate_for(
        profile: str, identity: str, session_id: str
    ) -> ipaddress.IPv4Address | None:
        name = pool_of.get(profile)
        return pools[name].allocate(session_id) if name else None

    def allocate(identity: str, session_id: str) -> ipaddress.IPv4Address | None:
        ident = Identity.from_string(identity)
        for profile in profiles:
            if profile.admits(ident):
                return allocate_for(profile.name, identity, session_id)
        return None

    def release(address: ipaddress.IPv4Address) -> None:
        for pool in pools.values():
            if pool.release(address):
                return

    return ResponderConfig(
        profiles=profiles,
        allocate_address=allocate,
        release_address=release,
        allocate_for_profile=allocate_for,
    )


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
