"""Plumbing shared by the three services: settings, gRPC server factory,
metrics, request-id logging and graceful shutdown."""
