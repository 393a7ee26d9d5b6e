"""espgate's IKEv2 responder core (RFC 7296), sans-I/O.

messages    the wire codec: header, payloads, `DecodeError`, `ProtocolError`
crypto      key exchange, prf/prf+, key derivation, SK payload protection
profiles    identities, profiles and the responder configuration
proposals   choosing IKE and ESP proposals
trafficsel  traffic selector narrowing
sa          IKE SA / CHILD SA state and the IKE SA state machine
tasks       one task per exchange concern, and the payload rule tables
events      events and datagrams handed to the daemon
responder   `IkeResponder`, the manager the daemon drives
"""
