"""Shared test harnesses (moto server, GCE fake, SSH hosts, local cluster) as pytest fixtures."""
