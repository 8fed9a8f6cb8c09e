"""The helper aggregator: the second server of secure aggregation (docs/secure-aggregation.md).

Run by an institution independent of the coordinator. It keeps its own roster of silos
(each enrols here with its own one-time token and registers its Ed25519 key), opens
the seeds of masked updates only as weighted sums over at least ``k_min`` distinct
silos, each seed at most once ever, and records every decision in its own hash-chained
audit log. It never receives a share.
"""
