"""What travels between the ServerApp and a site's ClientApp: record names, config keys, metric keys,
error codes and round arithmetic. Both sides import these; nothing else spells them."""

from __future__ import annotations

import re

# Records of a Message-API message (Flower's strategies name the config record "config").
ARRAYS_RECORD = "arrays"  # ArrayRecord: the head, keyed by parameter name
METRICS_RECORD = "metrics"  # MetricRecord: the site's scalar metrics
CONFIG_RECORD = "config"  # ConfigRecord: the round's config from the server
SITE_RECORD = "site"  # optional ConfigRecord in a train reply: exactly {SITE_NAME_KEY: <site name>}
SITE_NAME_KEY = "name"

# Keys of the round's config.
SERVER_ROUND = "server-round"  # Flower's round number within this ServerApp run
ROUND_OFFSET = "round-offset"  # rounds done before a resume: absolute round = server-round + offset
PROXIMAL_MU = "proximal-mu"  # FedProx's mu (0 or absent: plain local training)
HEAD_KEYS = "head-keys"  # SecAgg+ fit config: JSON list of the head's parameter names, in order
HEAD_SHAPES = "head-shapes"  # SecAgg+ fit config: JSON {name: shape} (0-d travel as shape (1,))

# Metric keys the server reads.
NUM_EXAMPLES = "num-examples"  # the site's weight in the mean; must be > 0

# Error codes of a site's error reply.
DECLINED_ERROR_CODE = 4001  # the site declined the round (privacy budget): not a failure
CLIENT_APP_RAISED_EXCEPTION = 2  # flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION
NODE_UNAVAILABLE_CODE = 5  # flwr.common.constant.ErrorCode.NODE_UNAVAILABLE (dead SuperNode)

# A site's name, and the prefix naming it in front of an error reason.
SITE_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
SITE_NAME = re.compile(SITE_NAME_PATTERN)
SITE_ERROR_PREFIX = re.compile(r"\[site (" + SITE_NAME_PATTERN + r")\] ")


def site_error_reason(name: str, reason: str) -> str:
    """An error reason naming the site (``[site NAME] reason``)."""
    return f"[site {name}] {reason}"


def absolute_round(server_round: int, offset: int) -> int:
    """The run's round number: Flower's ``server_round`` plus the rounds done before a resume."""
    return int(server_round) + int(offset)
