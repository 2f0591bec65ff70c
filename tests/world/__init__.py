"""The test world: real services (registry, token issuer, fault proxy) that tests run against."""
