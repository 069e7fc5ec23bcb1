"""tga/unlearn

Textual unlearning baseline ("Cross-Modal Safety Alignment: Is textual unlearning all you need?", arXiv 2406.02575,
with the loss of Yao et al. 2023): the LLM inside the VLM forgets harmful responses from text only (or, for the cost
comparison, from image+text examples), while a KL term keeps it close to the original on normal data.
"""

from tga.unlearn.data import Pair, load_pairs, load_refusals
from tga.unlearn.loss import UnlearnWeights, response_kl, response_nll, unlearn_loss

__all__ = ["Pair", "UnlearnWeights", "load_pairs", "load_refusals", "response_kl", "response_nll", "unlearn_loss",
           "run_unlearn"]


def run_unlearn(argv: list[str]) -> str:
    """`tga unlearn` (see tga.unlearn.run); imported lazily so that the data and loss helpers stay light."""
    from tga.unlearn.run import run_unlearn as run

    return run(argv)
