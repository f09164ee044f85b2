"""Tests of the deployment tooling: deploy/pki.sh, secure deploy-local and the operator runbook."""
