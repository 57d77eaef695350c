"""Tools: training (fit), expression prediction, cross-modal retrieval and evaluation."""

from ._evaluate import evaluate
from ._fit import fit
from ._integration import integration_metrics
from ._metrics import pearson_per_gene
from ._predict import predict_expression
from ._retrieve import retrieve
