"""The export graph: image batch -> (logits, score, is_ood, p_value), in standard torch ops only.

:func:`build_graph` turns a :class:`~ascood.deploy.Detector` into one
``nn.Module`` whose forward takes ``images`` float32 (B, C, S, S), pixel
values in [0, 1] after the resize and centre crop (the detector's
preprocessing), and returns

* ``logits``  (B, K) float32, the model's;
* ``score``   (B,) float32, the scorer's (higher = more ID);
* ``is_ood``  (B,) bool, ``p_value <= k / (n + 1)`` (= ``score < threshold``);
* ``p_value`` (B,) float64, (1 + #{calibration <= score}) / (n + 1).

Everything the decision needs is inside as constants: the mean/std
normalisation, the scorer's fitted state (KNN / NNGuide / Relation banks, MDS
means and precision, ViM basis, ReAct clip, T, ...) and the n sorted
calibration scores.

The fused ops do not appear in the graph: they are *lowered* to plain torch
ops here, so the exported file runs with torch alone (torch.export,
TorchScript) or with ONNX Runtime alone, without ascood or ascood_kernels.
The z-score head becomes ``(h - mean) / (std_unbiased + 1e-6) * sigma`` (the
formula of ``ascood_kernels.reference.zscore``, float32); i-ODIN / ODIN's
``iodin_perturb`` becomes a top-k of |grad| and a signed step. The scorer code
here is a second, independent implementation of each scorer's formula; the
parity tests compare it with :meth:`Detector.predict`, which runs the
scorers' own code.

Input-gradient scorers (ODIN, i-ODIN, MDS with eps > 0) compute d loss / d
images inside the graph: :class:`PerturbGraph` with ``grad="func"``
(``torch.func.grad``, traced to aten backward ops for torch.export:
:class:`FuncPerturbGraph`) or ``grad="autograd"`` (``torch.autograd.grad``, for
TorchScript). ONNX has no
gradient operator in its inference opsets, so they do not export to ONNX.
"""
from __future__ import annotations

import torch
from torch import nn

from ..scoring.scorers.features import has_feature_head
from ..scoring.scorers.perturb import model_input_std
from ..scoring.scorers.shaping import top_k_count

__all__ = ["build_graph", "DetectorGraph", "PerturbGraph", "FuncPerturbGraph", "LoweredNet", "PlainNet", "GRADIENT_SCORERS", "ZSCORE_EPS"]

GRADIENT_SCORERS = ("odin", "iodin")
ZSCORE_EPS = 1e-6  # ascood_kernels.zscore's default, used by ASCOODNet


class LoweredNet(nn.Module):
    """An ASCOODNet's forward with its z-score head in plain ops: x (B, C, S, S) -> (logits (B, K), h (B, m)).

    Shares the backbone and fc modules with the model (no copy).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.split = True
        self.backbone, self.fc = model.backbone, model.fc
        self.head_type = getattr(model, "head_type", "linear")
        self.sigma = float(getattr(model, "sigma", 1.0))
        if self.head_type not in ("zscore", "l2", "linear"):
            raise ValueError(f"cannot lower head {self.head_type!r}")

    def standardize(self, h: torch.Tensor) -> torch.Tensor:
        """The head's h -> h~ in float32 plain ops (reference formula of the fused zscore op)."""
        if self.head_type == "zscore":
            hf = h.float()
            mean = hf.mean(dim=-1, keepdim=True)
            centred = hf - mean
            std = torch.sqrt((centred * centred).sum(dim=-1, keepdim=True) / (hf.shape[-1] - 1))
            return (centred / (std + 1e-6) * self.sigma).to(h.dtype)  # 1e-6 = ZSCORE_EPS (TorchScript wants a literal)
        if self.head_type == "l2":
            return h / (torch.sqrt((h * h).sum(dim=-1, keepdim=True)) + 1e-6)
        return h

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.backbone(x)
        return self.fc(self.standardize(h)).float(), h.float()


class PlainNet(nn.Module):
    """A classifier without a feature head, called as it is: x -> (logits, logits); only logit scorers use it.

    It must itself hold only standard ops (no ascood fused op) to export.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.split = False
        self.model = model

    def standardize(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.model(x).float()
        return z, z  # no feature: the logits stand in (never read by the logit scorers)


def lowered_net(model: nn.Module) -> nn.Module:
    """:class:`LoweredNet` for a model with a feature head, else :class:`PlainNet`."""
    return LoweredNet(model) if has_feature_head(model) else PlainNet(model)


def _lse(z: torch.Tensor) -> torch.Tensor:
    """logsumexp over dim 1 written out (max + log-sum-exp of the shifted rows): ONNX and TorchScript friendly."""
    m = z.amax(1, keepdim=True)
    return (m + torch.log(torch.exp(z - m).sum(1, keepdim=True)))[:, 0]


def _l2n(h: torch.Tensor) -> torch.Tensor:
    return h / torch.sqrt((h * h).sum(1, keepdim=True) + 1e-10)


class _ScoreHead(nn.Module):
    """(logits (B, K) float32, raw feature h (B, m) float32) -> score (B,) float32."""

    def __init__(self, det, net: LoweredNet) -> None:
        super().__init__()
        s = det.scorer
        self.name = s.name
        self.net = net  # for fc / standardize (shared submodules; export sees them once)
        self.space_head = getattr(s, "feature_space", "raw") == "head"
        self.temperature = float(getattr(s, "temperature", 1.0) or 1.0)
        self.m_dim = int(det.model.feature_dim) if net.split else 0

    def in_space(self, h: torch.Tensor) -> torch.Tensor:
        return self.net.standardize(h) if self.space_head else h


class MSPHead(_ScoreHead):
    def forward(self, z, h):
        return torch.softmax(z / self.temperature, 1).amax(1)  # MSP has T = 1; TempScale the fitted T


class EBOHead(_ScoreHead):
    def forward(self, z, h):
        return self.temperature * _lse(z / self.temperature)


class MLSHead(_ScoreHead):
    def forward(self, z, h):
        return z.amax(1)


class GENHead(_ScoreHead):
    def __init__(self, det, net):
        super().__init__(det, net)
        self.gamma = float(det.scorer.gamma)
        self.m = min(int(det.scorer.M), det.num_classes)

    def forward(self, z, h):
        top = torch.softmax(z, 1).topk(self.m, dim=1).values
        return -(top.pow(self.gamma) * (1 - top).pow(self.gamma)).sum(1)


class EntropyHead(_ScoreHead):
    def forward(self, z, h):
        logp = torch.log_softmax(z.double(), 1)
        return (logp.exp() * logp).sum(1).float()


class KLMHead(_ScoreHead):
    def __init__(self, det, net):
        super().__init__(det, net)
        log_d = det.scorer.dists.double().log().nan_to_num(neginf=torch.finfo(torch.float64).min)
        self.register_buffer("log_d_t", log_d.T.contiguous())

    def forward(self, z, h):
        logp = torch.log_softmax(z.double(), 1)
        p = logp.exp()
        kl = (p * logp).sum(1, keepdim=True) - p @ self.log_d_t
        return (-kl.amin(1)).float()


class _ShapingHead(_ScoreHead):
    def __init__(self, det, net):
        super().__init__(det, net)
        self.standardize_shaped = bool(det.scorer.standardize)

    def energy_of(self, shaped):
        hs = self.net.standardize(shaped) if self.standardize_shaped else shaped
        return _lse(self.net.fc(hs).float())


class ReActHead(_ShapingHead):
    def __init__(self, det, net):
        super().__init__(det, net)
        self.clip = float(det.scorer.threshold)

    def forward(self, z, h):
        return self.energy_of(h.clamp(max=self.clip))


class ASHHead(_ShapingHead):
    def __init__(self, det, net):
        super().__init__(det, net)
        self.k = top_k_count(self.m_dim, det.scorer.percentile)
        self.variant = det.scorer.variant

    def forward(self, z, h):
        vals, idx = h.topk(self.k, dim=1)
        s1 = h.sum(1, keepdim=True)
        if self.variant == "b":
            vals = (s1 / self.k).expand_as(vals)
        elif self.variant == "s":
            vals = vals * torch.exp(s1 / vals.sum(1, keepdim=True))
        return self.energy_of(torch.zeros_like(h).scatter(1, idx, vals))


class SCALEHead(_ShapingHead):
    def __init__(self, det, net):
        super().__init__(det, net)
        self.k = top_k_count(self.m_dim, det.scorer.percentile)

    def forward(self, z, h):
        s1 = h.sum(1, keepdim=True)
        s2 = h.topk(self.k, dim=1).values.sum(1, keepdim=True)
        return self.energy_of(h * torch.exp(s1 / s2))


class DICEHead(_ScoreHead):
    def __init__(self, det, net):
        super().__init__(det, net)
        self.register_buffer("w_t", det.scorer.masked_weight().float().T.contiguous())
        self.register_buffer("bias", det.scorer.bias.float().clone())

    def forward(self, z, h):
        return _lse(self.in_space(h) @ self.w_t + self.bias)


class GradNormHead(_ScoreHead):
    def __init__(self, det, net):
        super().__init__(det, net)
        # feature_space "raw": the last layer at the raw h, fc(h) (OpenOOD's quantity; see scorers.gradnorm).
        self.raw_fc = not self.space_head and bool(getattr(net, "split", False))

    def forward(self, z, h):
        x = self.in_space(h).double()
        if self.raw_fc:
            z = self.net.fc(h)
        p = torch.softmax(z.double() / self.temperature, 1)
        dz = (p * p.shape[1] - 1).abs().sum(1)
        return (dz * x.abs().sum(1) / self.temperature).float()


class KNNHead(_ScoreHead):
    def __init__(self, det, net):
        super().__init__(det, net)
        bank = _bank(det.scorer.bank)
        self.register_buffer("bank_t", bank.T.contiguous())
        self.k = min(int(det.scorer.K), bank.shape[0])

    def forward(self, z, h):
        sims = _l2n(self.in_space(h)) @ self.bank_t
        kth = sims.topk(self.k, dim=1).values[:, self.k - 1]
        return -(2.0 - 2.0 * kth)


class NNGuideHead(_ScoreHead):
    def __init__(self, det, net):
        super().__init__(det, net)
        bank = _bank(det.scorer.bank_rows)
        self.register_buffer("bank_t", bank.T.contiguous())
        self.k = min(int(det.scorer.K), bank.shape[0])

    def forward(self, z, h):
        guidance = (_l2n(self.in_space(h)) @ self.bank_t).topk(self.k, dim=1).values.mean(1)
        return guidance * _lse(z)


class RelationHead(_ScoreHead):
    def __init__(self, det, net):
        super().__init__(det, net)
        bank = _bank(det.scorer.bank)
        m = int(det.scorer.m)
        self.register_buffer("feat_t", bank[:, :m].T.contiguous())
        self.register_buffer("prob_t", bank[:, m:].T.contiguous())
        self.pow, self.thr = float(det.scorer.pow), float(det.scorer.threshold)

    def forward(self, z, h):
        rel = (_l2n(self.in_space(h)) @ self.feat_t).clamp(min=0) * (torch.softmax(z, 1) @ self.prob_t)
        rel = rel * (rel.abs() > self.thr).to(rel.dtype)
        return (torch.sign(rel) * rel.abs().pow(self.pow)).sum(1)


def _mahalanobis(h, means, precision):
    hp = h @ precision
    return (hp * h).sum(1, keepdim=True) - 2 * hp @ means.T + ((means @ precision) * means).sum(1)[None]


class MDSHead(_ScoreHead):
    def __init__(self, det, net):
        super().__init__(det, net)
        s = det.scorer
        self.register_buffer("means", s.means.double().clone())
        self.register_buffer("precision", s.precision.double().clone())
        self.relative = s.name == "rmds"
        # Empty for MDS: TorchScript compiles the RMDS branch too and needs the attributes to exist.
        # (Two distinct empty tensors: torch.jit.trace refuses one tensor shared by two buffers.)
        self.register_buffer("whole_mean", s.whole_mean.double().clone() if self.relative
                             else torch.zeros(0, dtype=torch.float64))
        self.register_buffer("whole_precision", s.whole_precision.double().clone() if self.relative
                             else torch.zeros(0, dtype=torch.float64))

    def distances(self, h):
        return _mahalanobis(self.in_space(h).double(), self.means, self.precision)

    def forward(self, z, h):
        d = self.distances(h)
        if self.relative:
            d = d - _mahalanobis(self.in_space(h).double(), self.whole_mean, self.whole_precision)
        return (-d).amax(1).float()


class ViMHead(_ScoreHead):
    def __init__(self, det, net):
        super().__init__(det, net)
        s = det.scorer
        self.register_buffer("u", s.u.double().clone())
        self.register_buffer("ns", s.NS.double().clone())
        self.register_buffer("w_t", s.W.double().T.contiguous())
        self.register_buffer("b", s.b.double().clone())
        self.alpha = float(s.alpha)

    def forward(self, z, h):
        x = self.in_space(h).double()
        r = (x - self.u) @ self.ns
        vlogit = torch.sqrt((r * r).sum(1)) * self.alpha
        return (_lse(x @ self.w_t + self.b) - vlogit).float()


class SHEHead(_ScoreHead):
    def __init__(self, det, net):
        super().__init__(det, net)
        self.register_buffer("patterns", det.scorer.patterns.double().clone())

    def forward(self, z, h):
        return (self.in_space(h).double() * self.patterns[z.argmax(1)]).sum(1).float()


HEADS = {"msp": MSPHead, "tempscale": MSPHead, "ebo": EBOHead, "mls": MLSHead, "gen": GENHead,
         "entropy": EntropyHead, "klm": KLMHead, "react": ReActHead, "ash": ASHHead, "scale": SCALEHead,
         "dice": DICEHead, "gradnorm": GradNormHead, "knn": KNNHead, "nnguide": NNGuideHead,
         "relation": RelationHead, "mds": MDSHead, "rmds": MDSHead, "vim": ViMHead, "she": SHEHead}


def _bank(bank) -> torch.Tensor:
    """A fitted bank (the scorers' or a StoredBank) as one float32 CPU tensor (a graph constant)."""
    if hasattr(bank, "materialize"):
        return bank.materialize()
    out = torch.empty(bank.n, bank.width, dtype=torch.float32)
    for start in range(0, bank.n, 16384):
        stop = min(bank.n, start + 16384)
        out[start:stop] = bank.block(start, stop).float()
    return out


class DetectorGraph(nn.Module):
    """images (B, C, S, S) float32 in [0, 1] -> (logits, score, is_ood, p_value); see the module docstring."""

    def __init__(self, det) -> None:
        super().__init__()
        prep = det.preprocessing
        self.register_buffer("mean", torch.tensor(prep.mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(prep.std, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("calibration", det.calibration.double().contiguous().clone())
        self.k = int(det.k)  # is_ood <=> #{calibration <= score} < k
        self.n = int(det.calibration.numel())
        self.net = lowered_net(det.model)
        if det.scorer.name not in GRADIENT_SCORERS and not getattr(det.scorer, "needs_input", False):
            self.head = HEADS[det.scorer.name](det, self.net)

    def decide(self, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(is_ood (B,) bool, p_value (B,) float64) of scores (B,)."""
        below = (self.calibration[None, :] <= score.double()[:, None]).to(torch.int64).sum(1)
        return below < self.k, (below.double() + 1.0) / (self.n + 1.0)

    def forward(self, images: torch.Tensor):
        x = (images - self.mean) / self.std
        z, h = self.net(x)
        score = self.head(z, h)
        is_ood, p = self.decide(score)
        return z, score, is_ood, p


class ODINLoss(nn.Module):
    """Cross-entropy of z / T against the model's own argmax, summed over the batch (ODIN's, up to 1/B: the
    step uses only the gradient's sign and ranking, which a positive factor does not change)."""

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        target = z.argmax(1).detach()
        logp = torch.log_softmax(z / self.temperature, 1)
        return -logp.gather(1, target[:, None]).sum()


class MDSLoss(nn.Module):
    """Lee et al.'s: the Mahalanobis distance to the closest class mean, summed over the batch."""

    def __init__(self, head: "MDSHead") -> None:
        super().__init__()
        self.head = head

    def forward(self, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        d = self.head.distances(h)
        return d.gather(1, d.argmin(1, keepdim=True)).sum()


class PerturbGraph(DetectorGraph):
    """ODIN / i-ODIN / MDS(eps > 0): the score of the input moved along the sign of d loss / d input.

    The gradient comes from ``torch.autograd.grad`` (scriptable: the
    TorchScript graph then needs grad mode on when called, i.e. not under
    ``torch.no_grad()``); :class:`FuncPerturbGraph` uses ``torch.func.grad``,
    which torch.export (through make_fx) traces into aten backward ops.
    """

    def __init__(self, det) -> None:
        super().__init__(det)
        s = det.scorer
        n = det.preprocessing.channels * det.preprocessing.image_size ** 2
        self.topk = n if s.name in ("odin", "mds") else min(int(s.k), n)
        self.eps = float(s.eps)
        std = s.std if s.std is not None else model_input_std(det.model)
        std = [1.0] if std is None else ([float(std)] if isinstance(std, (int, float)) else [float(v) for v in std])
        if len(std) == 1:
            std = std * det.preprocessing.channels
        self.register_buffer("step_std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))
        if s.name == "mds":
            self.head = MDSHead(det, self.net)
            self.loss_fn = MDSLoss(self.head)
        else:  # ODIN's score is MSP at temperature T on the perturbed input
            self.head = MSPHead(det, self.net)
            self.loss_fn = ODINLoss(float(s.temperature))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        z, h = self.net(x)
        return self.loss_fn(z, h)

    def input_grad(self, x: torch.Tensor) -> torch.Tensor:
        xg = x.detach().requires_grad_(True)
        grads = torch.autograd.grad([self.loss(xg)], [xg])
        g = grads[0]
        assert g is not None
        return g.detach()

    def perturb(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """iodin_perturb in plain ops: the topk elements of largest |g| per sample move by -eps * sign / std_c."""
        step = self.eps * torch.where(g >= 0, torch.ones_like(g), -torch.ones_like(g)) / self.step_std
        if self.topk >= g[0].numel():
            return x - step
        flat = g.abs().flatten(1)
        # argmax returns the first maximal index: the reference's tie rule (lower index) for k = 1.
        idx = flat.argmax(1, keepdim=True) if self.topk == 1 else flat.topk(self.topk, dim=1).indices
        mask = torch.zeros_like(flat).scatter(1, idx, torch.ones_like(idx, dtype=flat.dtype)).reshape(g.shape)
        return x - step * mask

    def forward(self, images: torch.Tensor):
        x = (images - self.mean) / self.std
        g = self.input_grad(x)
        x_t = self.perturb(x, g).detach()
        z, _ = self.net(x)
        zt, ht = self.net(x_t)
        score = self.head(zt, ht)
        is_ood, p = self.decide(score)
        return z.detach(), score.detach(), is_ood, p.detach()


class FuncPerturbGraph(PerturbGraph):
    """:class:`PerturbGraph` with the gradient from ``torch.func.grad`` (for torch.export via make_fx)."""

    def input_grad(self, x: torch.Tensor) -> torch.Tensor:
        return torch.func.grad(self.loss)(x)


def build_graph(det, grad: str = "func") -> DetectorGraph:
    """The detector as one module (eval mode, parameters frozen); ``grad`` for input-gradient scorers."""
    s = det.scorer
    needs_grad = s.name in GRADIENT_SCORERS or getattr(s, "needs_input", False)
    if grad not in ("func", "autograd"):
        raise ValueError(f"grad must be 'func' or 'autograd', got {grad!r}")
    if s.record_extras():
        raise ValueError(f"scorer {s.name} cannot be exported yet: it reads the features of a perturbed input "
                         "(an input-gradient step and a second forward) that the graph does not lower; use the "
                         "detector from Python (ascood detector / Detector.predict)")
    if needs_grad:
        graph = FuncPerturbGraph(det) if grad == "func" else PerturbGraph(det)
    else:
        graph = DetectorGraph(det)
    graph.eval()
    for p in graph.parameters():
        p.requires_grad_(False)
    return graph

