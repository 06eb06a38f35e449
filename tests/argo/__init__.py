"""Tests of the Argo Workflows engine against a strict fake Argo Server and an S3 test server."""
