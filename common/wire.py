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
# The closed-form start (server/closed_form.py): query messages before round 1, and round 1's
# train config saying the head it carries is that start (sites keep it instead of their own map).
START_QUERY = "start-query"  # query config: START_CROSS or START_GRAM
START_CROSS = "cross"  # reply: the sums X'Y and Y'1 over the site's training rows
START_GRAM = "gram"  # reply: X~'X~ P for the direction P in the image tower's linear path
HEAD_STARTED = "head-started"  # train config: True when the head is the federation's start
# train config: JSON list of the run's classes, in the order of the head's class index, when the
# coordinator's are declared (server/model.describe_task); a site whose declared list differs fails
TASK_CLASSES = "task-classes"

# Metric keys the server reads.
NUM_EXAMPLES = "num-examples"  # the site's weight in the mean; must be > 0

# Every metric name a site may send (``fedembed audit`` flags any other). Producers:
# client/training.py (train-*), common/evaluation.py quick_metrics (held-out scores), and
# client/privacy PrivateRound.metrics (sample-level DP spend).
TRAIN_METRICS = frozenset({NUM_EXAMPLES, "train-loss", "train-seconds"})
HELD_OUT_METRICS = frozenset({"R@1", "R@5", "zs_acc", "zs_auroc", "centroid_acc"})
# report-eval: the received head's held-out scores, before training, sent with the update
PRE_TRAINING_EVAL_PREFIX = "eval-"
SAMPLE_DP_METRICS = frozenset(
    {
        "dp-epsilon",  # the total by the site's governing accountant (dp-accountant)
        "dp-epsilon-round",
        "dp-epsilon-rdp",  # the same total by RDP (Opacus)
        "dp-epsilon-pld",  # ... and by PLD (dp-accounting; absent where not computed)
        "dp-delta",
        "dp-noise-multiplier",
        "dp-sample-rate",
        "dp-steps",
    }
)
# A start query's reply: the rows summed and the sum of their image embeddings' squared norms.
SUM_SQUARES = "image-sum-squares"
START_METRICS = frozenset({NUM_EXAMPLES, SUM_SQUARES})
SECAGG_WEIGHT_METRIC = "num_examples"  # Flower's FitRes.num_examples: a SecAgg+ site's weight


def allowed_metrics(message_type: str, *, secagg: bool = False) -> frozenset[str]:
    """The metric names a site's reply to a ``message_type`` message may carry."""
    if message_type == "evaluate":
        return frozenset({NUM_EXAMPLES}) | HELD_OUT_METRICS
    if message_type == "query":
        return START_METRICS
    train = (
        TRAIN_METRICS
        | SAMPLE_DP_METRICS
        | {PRE_TRAINING_EVAL_PREFIX + name for name in HELD_OUT_METRICS}
    )
    return train | {SECAGG_WEIGHT_METRIC} if secagg else train


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
