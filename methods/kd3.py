"""KD³ — Tang, Chen, Niu, Sugiyama, Gong, "Distribution Shift Matters for Knowledge Distillation with
Webly Collected Images", ICCV 2023 (arXiv 2307.11469); official code tangjialiang97/KD3, `KDDD/`.

The three levels of the paper, as the official code implements them (shared/methods/kd3.md):
1. task level — dynamic instance selection: before every epoch, the pool is pseudo-labelled by a mix
   of teacher and student predictions (`selection_alpha`) and kept where the confidence beats a
   FlexMatch-style class threshold (`class_thresholds`, `select_indices`);
2. feature level — a SimKD-style projector feeds the frozen teacher classifier; the projected student
   map regresses the teacher map, each sample weighted by how much their predictions disagree
   (`weighted_feature_mse`);
3. sample level — MixDistribution (MixStyle on the input images, `mix_distribution`) and a SimCLR
   contrast between the clean and mixed embeddings (`nt_xent`).
The deployed student is backbone → projector → GAP → teacher classifier.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import DistillModule
from .errors import MethodError
from .registry import register

SELECTION_VIEW_OFFSET = 1 << 30  # the selection pass draws its own augmented view, not the training one


# -- 1. dynamic instance selection -----------------------------------------------------------------
def selection_alpha(epoch: int, total_epochs: int) -> float:
    """Teacher weight of the selection mix at (1-based) epoch e of E (official `time_d`, E = 240):

    α_e = 1 − exp(−5·((e + 1)/(2E/3) − 1)²)  if e < E/2,   else 0.
    """
    if total_epochs < 1:
        raise MethodError(f"total_epochs must be ≥ 1, got {total_epochs}")
    if epoch < total_epochs / 2:
        return 1.0 - math.exp(-5.0 * ((epoch + 1) / (2.0 * total_epochs / 3.0) - 1.0) ** 2)
    return 0.0


def class_thresholds(pseudo_labels: Tensor, num_classes: int, p_cutoff: float) -> Tensor:
    """FlexMatch-style per-class thresholds over the whole pool (kd3.md §1.4):

    n_c = #{i : label_i = c},  β_c = n_c / max_c′ n_c′,  τ_c = p_cutoff · β_c / (2 − β_c).
    """
    if pseudo_labels.numel() == 0:
        raise MethodError("class_thresholds: the pool is empty (no pseudo-labels)")
    counts = torch.bincount(pseudo_labels.long().flatten(), minlength=num_classes)[:num_classes].double()
    beta = counts / counts.max()
    return (p_cutoff * beta / (2.0 - beta)).float()


def select_indices(conf: Tensor, pseudo_labels: Tensor, thresholds: Tensor, min_keep: int) -> Tensor:
    """Pool indices i with conf_i > τ_{label_i} (strict), sorted.

    Fallback (the official code crashes on an empty selection): if fewer than `min_keep` pass, add for
    every pseudo-class with members its ⌈min_keep / #non-empty classes⌉ most confident images, then,
    if still short, the most confident of the rest, until `min_keep` (or the whole pool) is kept.
    """
    conf, pseudo_labels = conf.flatten(), pseudo_labels.flatten().long()
    keep = conf > thresholds.to(conf.device)[pseudo_labels]
    if int(keep.sum()) >= min_keep:
        return keep.nonzero().flatten()
    classes = torch.unique(pseudo_labels)
    per_class = math.ceil(min_keep / max(len(classes), 1))
    for c in classes:
        members = (pseudo_labels == c).nonzero().flatten()
        keep[members[conf[members].argsort(descending=True)[:per_class]]] = True
    short = min(min_keep, len(conf)) - int(keep.sum())
    if short > 0:
        rest = (~keep).nonzero().flatten()
        keep[rest[conf[rest].argsort(descending=True)[:short]]] = True
    return keep.nonzero().flatten()


# -- 2. projector, teacher-classifier reuse, weighted feature loss -------------------------------
class KD3Projector(nn.Module):
    """SimKD's bottleneck (official `models/util.py::KDDD`, factor 2) with build-time spatial alignment.

    conv1×1 C_S→C_T/f → BN → ReLU → conv3×3 C_T/f→C_T/f → BN → ReLU → conv1×1 C_T/f→C_T → BN → ReLU, no
    biases. If the student map is larger than the teacher's (`teacher_hw`, fixed at build time) it is
    average-pooled to the teacher's size; otherwise the teacher map (when given) is pooled to the student's.
    """

    def __init__(self, c_student: int, c_teacher: int, teacher_hw: int, factor: int = 2):
        super().__init__()
        mid = c_teacher // factor
        self.teacher_hw = int(teacher_hw)
        self.transfer = nn.Sequential(
            nn.Conv2d(c_student, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, c_teacher, 1, bias=False),
            nn.BatchNorm2d(c_teacher),
            nn.ReLU(inplace=True),
        )

    def forward(self, f_s: Tensor, f_t: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(h_S, f_T aligned to h_S's size or None)."""
        h = f_s.shape[2]
        if h > self.teacher_hw:
            f_s = F.adaptive_avg_pool2d(f_s, (self.teacher_hw, self.teacher_hw))
        elif f_t is not None and f_t.shape[2] != h:
            f_t = F.adaptive_avg_pool2d(f_t, (h, h))
        return self.transfer(f_s), f_t


def weighted_feature_mse(h_s: Tensor, f_t: Tensor, logits_s: Tensor, logits_t: Tensor) -> Tensor:
    """Official `weight_mse_loss` with its distance weights (kd3.md §2):

    d_b = ‖z_S,b − z_T,b + ε‖₂ (ε = 1e-6, PyTorch's pairwise distance),  w_b = sigmoid(d_b) (detached),
    L_feat = mean over b, c, h, w of w_b · (h_S − f_T)².
    """
    w = torch.sigmoid(F.pairwise_distance(logits_s.float(), logits_t.float())).detach()
    sq = (h_s.float() - f_t.float()) ** 2
    return (w.view(-1, *([1] * (sq.dim() - 1))) * sq).mean()


# -- 3. MixDistribution and the contrastive term ----------------------------------------------------
def mix_distribution(x: Tensor, lam: Tensor, perm: Tensor, eps: float = 1e-6) -> Tensor:
    """MixStyle on the input images (official `MixDistribution.forward`, kd3.md §3):

    μ, σ = per-image, per-channel spatial mean and sqrt(unbiased variance + ε), detached;
    x′ = (x − μ)/σ · (λσ + (1 − λ)σ_π) + λμ + (1 − λ)μ_π.
    """
    mu = x.mean(dim=(2, 3), keepdim=True).detach()
    sig = (x.var(dim=(2, 3), keepdim=True) + eps).sqrt().detach()
    lam = lam.to(x.dtype).view(-1, 1, 1, 1)
    return (x - mu) / sig * (lam * sig + (1 - lam) * sig[perm]) + lam * mu + (1 - lam) * mu[perm]


class MixDistribution(nn.Module):
    """Samples λ_b ~ Beta(α, α) per image and a random permutation π, with probability p (else x)."""

    def __init__(self, p: float = 1.0, alpha: float = 0.1, eps: float = 1e-6):
        super().__init__()
        self.p, self.alpha, self.eps = p, alpha, eps

    def forward(self, x: Tensor) -> Tensor:
        if self.p < 1.0 and float(torch.rand(())) > self.p:
            return x
        b = x.shape[0]
        lam = torch.distributions.Beta(self.alpha, self.alpha).sample((b,)).to(x.device)
        perm = torch.randperm(b).to(x.device)
        return mix_distribution(x, lam, perm, self.eps)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent (official `Contrastive_loss_bn`), z = L2-normalised [z1; z2] (2B rows):

    s_ij = z_i·z_j / τ,  ℓ_i = −s_{i,pos(i)} + log Σ_{j≠i} exp(s_ij),  pos(i) = i ± B,  loss = mean_i ℓ_i.
    """
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = z.shape[0]
    b = n // 2
    sim = z @ z.t() / temperature
    pos = sim[torch.arange(n), (torch.arange(n) + b) % n]
    sim = sim.masked_fill(torch.eye(n, dtype=torch.bool, device=z.device), float("-inf"))
    return (torch.logsumexp(sim, dim=1) - pos).mean()


class Embed(nn.Module):
    """Linear + L2 normalisation (official `distiller_zoo/pro.py::Embed`)."""

    def __init__(self, d_in: int, d_out: int = 128):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


# -- the deployed model and the method ---------------------------------------------------------
class KD3Deployed(nn.Module):
    """Backbone → projector → GAP → teacher classifier. The student's own head is not part of it."""

    def __init__(self, student: nn.Module, projector: KD3Projector, head: nn.Module):
        super().__init__()
        self.student, self.projector, self.head = student, projector, head

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.projector(self.student.forward_features(x))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))

    def parameters(self, recurse: bool = True):
        unused = {id(p) for p in self.student.get_classifier().parameters()}
        return (p for p in super().parameters(recurse) if id(p) not in unused)


@register(
    "kd3",
    defaults={
        "p_cutoff": 0.95,
        "mix_weight": 0.001,
        "temperature": 0.3,
        "embed_dim": 128,
        "factor": 2,
        "mix_alpha": 0.1,
        "mix_p": 1.0,
        "selection": True,
        "weighting": True,
        "teacher_contrast": True,
    },
)
class KD3(DistillModule):
    """KD³: selection + projector/teacher-classifier feature loss + MixDistribution contrast, on a web pool."""

    train_data = "pool"

    def __init__(self, student: nn.Module, teacher, **kwargs):
        super().__init__(student, teacher, **kwargs)
        hp, tmodel = self.hp, teacher.model
        size, chans = self._teacher_input(teacher)
        with torch.no_grad():
            teacher_hw = tmodel.forward_features(torch.zeros(1, chans, size, size)).shape[-1]
        self.projector = KD3Projector(
            student.feature_info[-1]["num_chs"], tmodel.feature_info[-1]["num_chs"], teacher_hw, int(hp.factor)
        )
        # the teacher's classifier, frozen, inside the deployed model; gradients still reach the projector
        self.teacher_head = copy.deepcopy(tmodel.get_classifier()).requires_grad_(False).train()
        student.get_classifier().requires_grad_(False)  # the student's own head is never trained nor used
        self.mix = MixDistribution(hp.mix_p, hp.mix_alpha) if hp.mix_weight > 0 else None
        self.embed_s = Embed(student.num_features, int(hp.embed_dim)) if self.mix else None
        self.embed_t = Embed(tmodel.num_features, int(hp.embed_dim)) if self.mix and hp.teacher_contrast else None
        self._kept: Tensor | None = None
        self._selection_stats: dict[str, float] = {}

    @staticmethod
    def _teacher_input(teacher) -> tuple[int, int]:
        spec = (teacher.info or {}).get("input") or {}
        if "size" not in spec or "channels" not in spec:
            raise MethodError("kd3 sizes its projector from the teacher's input (sidecar `input.size`/`channels`)")
        return int(spec["size"]), int(spec["channels"])

    # -- the deployed student ----------------------------------------------------------------
    def deployed_model(self) -> nn.Module:
        return KD3Deployed(self.student, self.projector, self.teacher_head)

    def deployed_logits(self, x: Tensor) -> Tensor:
        h, _ = self.projector(self.student.forward_features(x))
        return self.teacher_head(F.adaptive_avg_pool2d(h, 1).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.deployed_logits(x)

    def _evaluate(self, batch: Mapping[str, Tensor], split: str) -> None:
        self.eval_metrics[split].update(self.deployed_logits(batch["image"]), batch["label"])
        self._updated_splits.add(split)

    # -- training ------------------------------------------------------------------------------
    def losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        x = batch["image"]
        x_mix = self.mix(x) if self.mix is not None else None  # once: teacher and student see the same x′
        f_t, emb_t, logits_t = self.teacher.run(_map_embedding_logits, x)
        f_s = self.student.forward_features(x)
        h_s, f_t = self.projector(f_s, f_t)
        logits_s = self.teacher_head(F.adaptive_avg_pool2d(h_s, 1).flatten(1))
        if self.hp.weighting:
            feat = weighted_feature_mse(h_s, f_t, logits_s, logits_t)
        else:  # ablation: w ≡ 1
            feat = F.mse_loss(h_s.float(), f_t.float())
        terms = {"feat": feat}
        if self.mix is not None:
            e_s = self.embed_s(self.student.forward_head(f_s, pre_logits=True))
            e_s_mix = self.embed_s(self.student.forward_head(self.student.forward_features(x_mix), pre_logits=True))
            contrast = nt_xent(self._gather(e_s), self._gather(e_s_mix), self.hp.temperature)
            if self.embed_t is not None:
                _, emb_t_mix, _ = self.teacher.run(_map_embedding_logits, x_mix)
                contrast = contrast + nt_xent(
                    self._gather(self.embed_t(emb_t)), self._gather(self.embed_t(emb_t_mix)), self.hp.temperature
                )
            terms["mix"] = self.hp.mix_weight * contrast
        return terms

    def _gather(self, z: Tensor) -> Tensor:
        """All ranks' embeddings (the local part keeps its gradient), so negatives span the global batch."""
        if self._trainer is None or self.trainer.world_size == 1:
            return z
        return self.all_gather(z, sync_grads=True).flatten(0, 1)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.hp.selection:  # selection runs whenever the train loader is built: rebuild it every epoch
            self.trainer.reload_dataloaders_every_n_epochs = 1

    # -- dynamic instance selection (called by the datamodule each time it builds the train loader) --
    @torch.no_grad()
    def select_pool_indices(self, datamodule) -> Tensor | None:
        if not self.hp.selection:
            return None
        if not self.trainer.training and self._kept is not None:  # e.g. the runner's cost probe after fit
            return self._kept
        epoch = self.current_epoch + 1  # 1-based, as the official loop counts
        alpha = selection_alpha(epoch, self.epochs)
        start = time.perf_counter()
        conf, labels, index = self._selection_pass(datamodule, alpha, epoch)
        thresholds = class_thresholds(labels, self.num_classes, self.hp.p_cutoff)
        strict = int((conf > thresholds[labels]).sum())
        local = select_indices(conf, labels, thresholds, min_keep=datamodule.global_batch)
        kept = index[local].sort().values
        self._kept = kept.cpu()
        self._selection_stats = self._describe(kept.cpu(), labels[local].cpu(), datamodule, len(index))
        self._selection_stats.update(
            epoch=epoch,
            alpha=alpha,
            fallback=float(strict < datamodule.global_batch),
            time_s=time.perf_counter() - start,
        )
        return self._kept

    def _selection_pass(self, datamodule, alpha: float, epoch: int) -> tuple[Tensor, Tensor, Tensor]:
        """Confidence and pseudo-label of every pool image under z = α·z_T + (1 − α)·z_S (eval mode)."""
        loader = datamodule.pool_loader(train=False)
        loader.batch_sampler.sampler.set_epoch(SELECTION_VIEW_OFFSET + epoch)
        was_training = self.training
        self.eval()
        conf, labels, index = [], [], []
        try:
            for batch in loader:
                x = batch["image"].to(self.device)
                z = self.deployed_logits(x).float()
                if alpha > 0:  # α = 0 in the second half: the teacher's logits would be multiplied by 0
                    z = alpha * self.teacher.logits(x).float() + (1 - alpha) * z
                p, y = F.softmax(z, dim=1).max(dim=1)
                conf.append(p)
                labels.append(y)
                index.append(batch["index"].to(self.device))
        finally:
            self.train(was_training)
        conf, labels, index = torch.cat(conf), torch.cat(labels), torch.cat(index)
        if self.trainer.world_size > 1:  # each rank scored a shard: gather all (padded to equal length)
            conf, labels, index = self._gather_shards(conf, labels, index, len(datamodule.pool_set))
        return conf, labels, index

    def _gather_shards(self, conf: Tensor, labels: Tensor, index: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
        width = math.ceil(n / self.trainer.world_size)
        pad = width - len(index)
        conf = F.pad(conf, (0, pad), value=-1.0)
        labels = F.pad(labels, (0, pad), value=0)
        index = F.pad(index, (0, pad), value=-1)
        conf, labels, index = (self.all_gather(t).flatten() for t in (conf, labels, index))
        valid = index >= 0
        order = index[valid].argsort()
        return conf[valid][order], labels[valid][order], index[valid][order]

    def _describe(self, kept: Tensor, kept_labels: Tensor, datamodule, pool_size: int) -> dict[str, float]:
        stats = {"kept": float(len(kept)), "kept_fraction": len(kept) / max(pool_size, 1)}
        hist = torch.bincount(kept_labels, minlength=self.num_classes)
        stats.update({f"kept_class{c}": float(v) for c, v in enumerate(hist.tolist())})
        membership = getattr(datamodule, "pool_membership", None)
        if membership is not None:  # hidden labels of the small protocols: diagnostics only
            in_dist = membership["in_distribution"]
            hits = float(in_dist[kept].sum())
            stats.update(precision=hits / max(len(kept), 1), recall=hits / max(float(in_dist.sum()), 1.0))
            stats["base_rate"] = float(in_dist.float().mean())
        return stats

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        # the epoch's selection diagnostics, once (on_train_epoch_start may not log per step)
        for key, value in self._selection_stats.items():
            self.log(f"select/{key}", float(value), on_step=True, on_epoch=True, batch_size=1)
        self._selection_stats = {}
        return super().training_step(batch, batch_idx)


def _map_embedding_logits(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Last-stage map, pooled embedding and logits of a timm-contract model, in one pass."""
    f = model.forward_features(x)
    emb = model.forward_head(f, pre_logits=True)
    return f, emb, model.get_classifier()(emb)
