"""Diffusion Attribution Score (DAS; Lin et al., ICLR 2025, eqs. 9-18), in two forms.

Derivation (DAS eqs. 11-16 with the least-squares leave-one-out identity of docs/methods.md)
----------------------------------------------------------------------------------------
Linearise the noise predictor around the trained parameters theta* (eq. 11). For training example i
let J_i be the Jacobian of its output (r rows: r = 1 for a scalar output, r sketch directions for
the vector output) and e_i = target - output its residual at theta*. Training is then the damped
least-squares problem

    L(theta) = 1/2 sum_j ||e_j - J_j (theta - theta*)||^2 + lambda/2 ||theta - theta_0||^2,

whose Gauss-Newton Hessian is H = sum_j J_j^T J_j + lambda I = Phi^T Phi + lambda I (Phi stacks every
row of every J_j; DAS eqs. 13/23 up to the factor 2) and whose stationarity at theta* reads
sum_j J_j^T e_j = lambda (theta* - theta_0). Removing z_i and taking ONE Newton step from theta*
(eqs. 13/25): grad L_{-i}(theta*) = J_i^T e_i and Hessian H - J_i^T J_i, so

    theta_{-i} - theta* = -(H - J_i^T J_i)^{-1} J_i^T e_i
                        = -H^{-1} J_i^T (I_r - H_ii)^{-1} e_i,      H_ii = J_i H^{-1} J_i^T   (r x r),

by the Woodbury identity (A - U^T U)^{-1} U^T = A^{-1} U^T (I - U A^{-1} U^T)^{-1}; for r = 1 this is
the Sherman-Morrison step of eq. 15, theta_{-i} - theta* = -H^{-1} phi_i e_i / (1 - h_i), the classic
beta_{-i} = beta - (X^T X)^{-1} x_i e_i / (1 - h_i) of least squares. For a linear model the step is
exact (tests/unit/scorers/test_scorers_das.py checks it against refitting without z_i). The predicted change of the
query's output is J_q (theta_{-i} - theta*), and DAS (eqs. 12/16) scores its squared norm:

    S[q, i] = || J_q H^{-1} J_i^T (I - H_ii)^{-1} e_i ||^2   (>= 0; DAS appendix D: ~ the rise of the
                                                             query's loss, so positive = z_i helped).

`leverage: false` drops (I - H_ii)^{-1} (first-order influence step instead of leave-one-out).
With Phi^T Phi = V diag(s2) V^T (one eigendecomposition for every lambda) and a_i = J_i V:
H^{-1} J_i^T = V diag(1 / (s2 + lambda)) a_i^T and H_ii = a_i diag(1 / (s2 + lambda)) a_i^T, computed over
chunks of training examples (the features stay memory-mapped; scorers/trak.py "Memory").

Timesteps (eqs. 17-18): one computation for the whole generation from features averaged over the K
timesteps after unit-normalising each timestep's gradient (the gradients stage does this: kinds
`unitnorm` and `sketch<r>`). lambda is relative to the mean eigenvalue of Phi^T Phi, swept on the
tuning subsets like every other damping.

Form `scalar` (the reference implementation, github.com/Jinxu-Lin/DAS, CIFAR2/07_scpre.py, 'DAS1'):
output f = mean of eps_theta, phi = unit-normalised timestep average (store kind `unitnorm`), and a
per-example residual magnitude r_i = mean_k rho_ik / ||rho_i||, rho_ik = sqrt(mean_pix (eps_k -
eps_theta)^2) at the store's (t, eps) draws (the reference uses 1000 timesteps for the residuals; we
use the gradient draws). Score, as the reference, signed and not squared:

    S[q, i] = phi(x_q)^T H^{-1} phi(z_i) r_i  [ / (1 - h_i) with `leverage: true` ],

which is -J_q (theta_{-i} - theta*) above with e_i = r_i (tested). Deviation: the reference's leverage
variant divides by a query-train 'hat' diagonal squared; we use the training leverage h_i of eq. 15.

Form `vector` (the paper's eq. 16 with the output dimensions kept): store kind `sketch<r>` gives per
example r rows J_i = mean_k w_ik U_k J_ik (U_k: r random output directions of timestep k, w_ik =
1/||U_k J_ik||_F) and the residual e_i = mean_k w_ik U_k (eps_k - eps_theta) in R^r. Averaging
independently sketched timesteps is an r-row sketch of the stacked (timestep, pixel) output, so
S[q, i] above estimates the squared change of the whole (weighted) noise prediction of the query.
"""

from __future__ import annotations

import numpy as np

from workflow_scripts.core.contracts import VECTOR_OUTPUT
from workflow_scripts.scorers.base import (
    ENSEMBLE,
    LAMBDA_GRID,
    OUTPUT_FUNCTION,
    POSINT,
    TIMESTEPS,
    Scorer,
    StoreNeed,
    expected_store,
    method_schema,
    row_chunks,
)
from workflow_scripts.scorers.trak import KernelSolver, kernel_eigh


def scalar_scores(
    solver: KernelSolver, queries: np.ndarray, residuals: np.ndarray, relative_lambda: float, leverage: bool
) -> np.ndarray:
    """Reference form: phi_q^T H^{-1} phi_i r_i [/(1 - h_i)], (n_query, n_train)."""
    weight = np.asarray(residuals, dtype=np.float64)
    if leverage:
        weight = weight / (1.0 - solver.leverages(relative_lambda))
    return solver.scores(queries, relative_lambda) * weight[None, :]


def scalar_parameter_changes(
    solver: KernelSolver, residuals: np.ndarray, relative_lambda: float, leverage: bool = True
) -> np.ndarray:
    """(n_train, d) predicted theta_{-i} - theta* = -H^{-1} phi_i e_i [/(1 - h_i)] (for checking eq. 15)."""
    weight = np.asarray(residuals, dtype=np.float64) / ((1.0 - solver.leverages(relative_lambda)) if leverage else 1.0)
    return -solver.preconditioned_train(relative_lambda) * weight[:, None]


class VectorKernelSolver:
    """The vector-output form for many lambdas from one eigendecomposition H0 = sum_i J_i^T J_i = V diag(s2) V^T,
    streaming the (n, r, d) training features in chunks of examples (memory: d x d + n_query x r x d + scores)."""

    def __init__(self, train_features: np.ndarray):
        if train_features.ndim != 3:
            raise ValueError(f"vector-output DAS needs (n, r, d) features, got shape {train_features.shape}")
        self.phi = train_features
        self.n, self.r, self.d = train_features.shape
        self.s2, self.v = kernel_eigh(train_features)
        self.scale = float(self.s2.sum() / self.d)

    def absolute(self, relative_lambda: float) -> float:
        return relative_lambda * self.scale

    def _chunks(self, relative_lambda: float):
        """(rows, a_i = J_i V (b, r, d), 1 / (s2 + lambda)) chunk by chunk."""
        inverse = 1.0 / (self.s2 + self.absolute(relative_lambda))
        for rows, chunk in row_chunks(self.phi):
            yield rows, chunk @ self.v, inverse

    def leverage_blocks(self, relative_lambda: float) -> np.ndarray:
        """(n, r, r) H_ii = J_i H^{-1} J_i^T."""
        out = np.empty((self.n, self.r, self.r))
        for rows, a, inverse in self._chunks(relative_lambda):
            out[rows] = np.einsum("irm,m,ism->irs", a, inverse, a)
        return out

    def _coefficients(self, residuals: np.ndarray, relative_lambda: float, leverage: bool):
        """(rows, c (d, b)) chunk by chunk, with H^{-1} J_i^T v_i = V c_i, v_i = (I - H_ii)^{-1} e_i (or e_i)."""
        e_all = np.asarray(residuals, dtype=np.float64).reshape(self.n, self.r)
        for rows, a, inverse in self._chunks(relative_lambda):
            e = e_all[rows]
            if leverage:
                blocks = np.einsum("irm,m,ism->irs", a, inverse, a)
                e = np.linalg.solve(np.eye(self.r)[None] - blocks, e[..., None])[..., 0]
            yield rows, inverse[:, None] * np.einsum("irm,ir->mi", a, e)

    def parameter_changes(self, residuals: np.ndarray, relative_lambda: float, leverage: bool = True) -> np.ndarray:
        """(n, d) predicted theta_{-i} - theta* = -H^{-1} J_i^T (I - H_ii)^{-1} e_i (holds n x d: small checks)."""
        return np.concatenate([-(c.T @ self.v.T) for _, c in self._coefficients(residuals, relative_lambda, leverage)])

    def scores(
        self, queries: np.ndarray, residuals: np.ndarray, relative_lambda: float, leverage: bool = True
    ) -> np.ndarray:
        """(n_query, n_train) ||J_q (theta_{-i} - theta*)||^2."""
        q = np.asarray(queries, dtype=np.float64)
        if q.ndim != 3 or q.shape[1:] != (self.r, self.d):
            raise ValueError(f"query features must be (n, {self.r}, {self.d}), got {q.shape}")
        qv = q @ self.v  # (q, r, d)
        out = np.empty((len(q), self.n))
        for rows, c in self._coefficients(residuals, relative_lambda, leverage):
            out[:, rows] = (np.einsum("qrm,mi->qri", qv, c) ** 2).sum(1)
        return out


def compute(method_cfg: dict, inputs, lambdas) -> list:
    leverage = method_cfg["leverage"]
    if method_cfg["form"] == "scalar":
        expect = expected_store(method_cfg, kind="unitnorm")
        solver = KernelSolver(inputs.features("final", "train", expect))
        residuals = inputs.residuals("final")
        queries = {name: inputs.features("final", name, expect) for name in inputs.query_sets}
        return [
            (
                lam,
                {
                    name: scalar_scores(solver, q, residuals, lam, leverage).astype(np.float32)
                    for name, q in queries.items()
                },
            )
            for lam in lambdas
        ]
    expect = expected_store(
        method_cfg, kind="sketch", output_function=VECTOR_OUTPUT, output_directions=method_cfg["output_directions"]
    )
    solver = VectorKernelSolver(inputs.features("final", "train", expect))
    residuals = inputs.residuals("final")
    queries = {name: inputs.features("final", name, expect) for name in inputs.query_sets}
    return [
        (lam, {name: solver.scores(q, residuals, lam, leverage).astype(np.float32) for name, q in queries.items()})
        for lam in lambdas
    ]


class DAS(Scorer):
    family = "das"
    schemas = (
        method_schema(
            "das",
            ["form", "output_function", "leverage"],
            form={"const": "scalar"},
            output_function=OUTPUT_FUNCTION,
            leverage={"type": "boolean"},
            timesteps=TIMESTEPS,
            lambda_grid=LAMBDA_GRID,
            ensemble=ENSEMBLE,
        ),
        method_schema(
            "das",
            ["form", "output_directions", "leverage"],
            form={"const": "vector"},
            output_directions=POSINT,
            leverage={"type": "boolean"},
            timesteps=TIMESTEPS,
            lambda_grid=LAMBDA_GRID,
            ensemble=ENSEMBLE,
        ),
    )
    model_families = ("ddpm", "latent")  # latent: the LoRA parameters, conditioned on the caption
    takes_ensemble = True
    refused_reason = "it linearises the DDPM noise predictor at DDPM timesteps (rule gradients)"

    def stores(self, method_cfg):
        k = method_cfg.get("timesteps")
        if method_cfg["form"] == "vector":
            return [StoreNeed("final", VECTOR_OUTPUT, "sketch", k, directions=method_cfg["output_directions"])]
        return [StoreNeed("final", method_cfg["output_function"], "unitnorm", k)]

    def compute(self, method_cfg, inputs, lambdas):
        return compute(method_cfg, inputs, lambdas)
