"""Admission, queue claims, leases, retries and finishing: the run lifecycle."""
