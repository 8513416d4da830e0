"""Supply chain and security: SBOM, provenance, scanning; no Dagster in here."""
