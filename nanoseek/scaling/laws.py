"""Power laws of compute, and the published coefficients our fits are compared with.

Every law here is `y = coef * C^exp` with C in FLOPs (C = M x D: DeepSeek LLM's non-embedding FLOPs per token
times training tokens, arXiv 2401.02954 §3.2). The constants are copied from the papers, each with its source,
so nothing reads a reference file at run time.

What a reader gets wrong: DeepSeek LLM's batch size B_opt is in *tokens*, not sequences (at C = 8.4e22 it gives
9.2M tokens = 2250 x 4096, against 2304 sequences in its Table 2); and its model scale is M, not 6N, so its
exponents (a, b) are not directly Chinchilla's (which counts N with C ~ 6ND, arXiv 2203.15556).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PowerLaw:
    """y = coef * C^exp."""

    coef: float
    exp: float

    def __call__(self, compute: float) -> float:
        return self.coef * compute**self.exp

    def to_dict(self) -> dict:
        return {"coef": self.coef, "exp": self.exp}


@dataclass(frozen=True)
class HparamLaw:
    """Optimal peak learning rate and batch size (tokens) as functions of compute."""

    eta: PowerLaw
    batch_tokens: PowerLaw
    source: str

    def to_dict(self) -> dict:
        return {"eta": self.eta.to_dict(), "batch_tokens": self.batch_tokens.to_dict(), "source": self.source}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> HparamLaw:
        """A law saved by `save` (e.g. `nanoseek scaling hparams` writes OUT/hparams_law.json)."""
        try:
            d = json.loads(Path(path).read_text())
            return cls(PowerLaw(**d["eta"]), PowerLaw(**d["batch_tokens"]), d.get("source", str(path)))
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(
                f"{path}: not a hyperparameter law written by `nanoseek scaling hparams` ({e})"
            ) from None


# DeepSeek LLM eq. 1 (arXiv 2401.02954 §3.1): eta_opt = 0.3118 C^-0.1250, B_opt = 0.2920 C^0.3271 tokens,
# fitted on a grid at 1e17..2e19 FLOPs; "near-optimal" = within 0.25% of the minimum generalization error.
DEEPSEEK_HPARAMS = HparamLaw(
    PowerLaw(0.3118, -0.1250), PowerLaw(0.2920, 0.3271), "DeepSeek LLM eq. 1 (arXiv 2401.02954 §3.1)"
)
NEAR_OPTIMAL = 0.0025  # DeepSeek LLM §3.1: within 0.25% of the minimum loss

# DeepSeek LLM eq. 4 (§3.2): M_opt = 0.1715 C^0.5243, D_opt = 5.8316 C^0.4757 (8 budgets, 1e17..3e20 FLOPs).
DEEPSEEK_M_OPT = PowerLaw(0.1715, 0.5243)
DEEPSEEK_D_OPT = PowerLaw(5.8316, 0.4757)


@dataclass(frozen=True)
class Published:
    name: str
    a: float  # M_opt (or N_opt) ~ C^a
    b: float  # D_opt ~ C^b
    source: str
    note: str


# DeepSeek LLM Table 4 (§3.2) and Chinchilla Table 2 (approach 2, IsoFLOP; 80% CI of a: 0.462-0.534).
PUBLISHED = (
    Published(
        "OpenAI (Kaplan et al.)",
        0.73,
        0.27,
        "arXiv 2001.08361; DeepSeek LLM Table 4",
        "OpenWebText2, N non-embedding",
    ),
    Published(
        "Chinchilla (Hoffmann et al.)",
        0.49,
        0.51,
        "arXiv 2203.15556 Table 2, approach 2",
        "MassiveText, N total",
    ),
    Published("DeepSeek LLM, early data", 0.450, 0.550, "arXiv 2401.02954 Table 4", "in-house data, M"),
    Published(
        "DeepSeek LLM, current data", 0.524, 0.476, "arXiv 2401.02954 Table 4 / eq. 4", "in-house data, M"
    ),
    Published("DeepSeek LLM, OpenWebText2", 0.578, 0.422, "arXiv 2401.02954 Table 4", "OpenWebText2, M"),
)

# Chinchilla approach 3 (arXiv 2203.15556 eq. 10) and the Epoch AI refit of its data (Besiroglu et al.,
# arXiv 2404.10102): L(N, D) = E + A / N^alpha + B / D^beta, N in parameters, D in tokens.
CHINCHILLA_PARAMETRIC = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
EPOCH_PARAMETRIC = {"E": 1.817, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}
