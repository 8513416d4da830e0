"""Deploy targets (local, docker), strategies, traffic router and health probes."""
