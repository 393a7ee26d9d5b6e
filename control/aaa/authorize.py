"""Authorization: assemble a session's policy from cached, user and group sources.

Theory of operation: once a peer is authenticated the core emits an
`AaaRequest` of kind "authorize" (see `control.ike.tasks.AuthorizeTask`) for
profiles with `authorization_user` or `authorization_group`. `Authorizer`
answers it:

1. cached: the attributes of the EAP or PSK Access-Accept (implicit
   authorization), unless the profile sets `authorization_cached = false`;
2. user: only when the cached answer gave nothing or no Framed-IP-Address,
   the user's policy: the local policy named by the username, or a RADIUS
   Access-Request for it. The username is the profile's
   `authorization_username`, else what its `name_mangler` derives, else the
   session's identity;
3. group: the local policy `authorization_group = "local:NAME"`, or a
   RADIUS Access-Request for `authorization_group_name`.

Merge, per attribute: user beats cached; that merged user beats the group,
unless `authorization_group_override` lets the group win. A RADIUS reject or
silence of a configured source refuses the session; a local user policy
that does not exist is no policy.
"""

from __future__ import annotations

import logging
from typing import Any

from control.aaa.attributes import Authorization, merge, parse_authorization
from control.aaa.mangle import parse_mangler
from control.aaa.radius import RadiusClient
from control.config import Config, ProfileConfig
from control.ike.eap import AaaRequest, AaaResult

log = logging.getLogger("espgate.aaa")


class AuthorizationError(Exception):
    """A configured authorization source refused or did not answer."""


class Authorizer:
    """Answer "authorize" requests from local policies and RADIUS groups."""

    def __init__(self, config: Config, radius: dict[str, RadiusClient]) -> None:
        self.config = config
        self.radius = radius
        self.profiles = {p.name: p for p in config.profiles}

    async def authorize(self, request: AaaRequest) -> AaaResult:
        """Return the merged policy of one session, or a reject."""
        profile = self.profiles[request.profile]
        info = request.info
        try:
            final = await self._merge(profile, request, info)
        except AuthorizationError as exc:
            log.warning("authorization of %s refused: %s", request.user_name, exc)
            return AaaResult("reject")
        return AaaResult("accept", policy=final.policy())

    async def _merge(
        self, profile: ProfileConfig, request: AaaRequest, info: dict[str, Any]
    ) -> Authorization:
        cached = Authorization()
        if profile.authorization_cached and info.get("cached"):
            cached = parse_authorization(info["cached"])

        # explicit user authorization only without a cached address
        user = Authorization()
        if profile.authorization_user is not None and (
            cached.is_empty() or cached.framed_ip_address is None
        ):
            name = self.username(profile, request, info)
            user = await self._source(profile.authorization_user, name, request)
        merged_user = merge(user, cached)

        group = Authorization()
        if profile.authorization_group is not None:
            source = profile.authorization_group
            name = (
                source.partition(":")[2]
                if source.startswith("local")
                else (profile.authorization_group_name or "")
            )
            group = await self._source(source, name, request)
        if profile.authorization_group_override:
            return merge(group, merged_user)
        return merge(merged_user, group)

    def username(
        self, profile: ProfileConfig, request: AaaRequest, info: dict[str, Any]
    ) -> str:
        """Return the username for user authorization (profile, mangler, identity)."""
        if profile.authorization_username:
            return profile.authorization_username
        if profile.name_mangler:
            mangler = parse_mangler(profile.name_mangler)
            name = mangler.apply(
                str(info.get("ike_identity") or request.user_name),
                info.get("eap_identity"),
                info.get("cert_dn"),
            )
            if name is None:
                raise AuthorizationError(
                    f"name mangler {profile.name_mangler} gave nothing"
                )
            return name
        return request.user_name

    async def _source(
        self, source: str, name: str, request: AaaRequest
    ) -> Authorization:
        kind, _, group = source.partition(":")
        if kind == "local":
            policy = self.config.policies.get(name)
            log.debug("authorization of %s: local policy %s %s", request.user_name,
                      name, "found" if policy else "absent")  # fmt: skip
            return merge(policy, Authorization()) if policy else Authorization()
        client = self.radius[group]
        outcome, attributes = await client.lookup(name, request.calling_station)
        if outcome != "accept":
            raise AuthorizationError(
                f"radius group {group} answered {outcome} for {name}"
            )
        return parse_authorization(attributes, client.stats)
