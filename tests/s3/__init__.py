"""Tests of the S3 storage kind, and the S3 test server other tests use."""
