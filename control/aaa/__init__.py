"""AAA for the headend: RADIUS authentication (EAP relay) and its daemon glue."""
