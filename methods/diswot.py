"""DisWOT — Dong, Li, Wei, "DisWOT: Student Architecture Search for Distillation WithOut Training",
CVPR 2023 (arXiv 2303.15678); spec ../shared/methods/diswot.md, official code lliai/DisWOT-CVPR2023.

Two stages: `search` scores every candidate student against a *randomly initialised* (Gaussian) copy
of the teacher with two training-free similarities — the semantic metric M_s (ICKD's inter-channel
kernel on the classifier-weight gradients) and the relation metric M_r (SP's batch Gram on the
pre-pooling maps) — and picks the argmax of −(M_s + M_r); `distill` then trains the chosen student
with KD (0.1·CE + 0.9·KD, T = 4), optionally plus the *reconstructed* DisWOT† distiller terms
(λ_s·ICKD + λ_r·SP on the last-stage maps; the release lacks that code, see the spec §2).

Fixed official quirks (spec §1): gradients of both networks are cleared before the one backward, the
full batch and the pre-pool map are used, the score is always M_s + M_r, every candidate of a seed
sees the same batch, and the search never peeks at ground truth.
"""

from __future__ import annotations

import json
import random
import time
import zlib
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import DistillModule
from .errors import MethodError
from .kd import kd_loss
from .registry import Stage, StageContext, register

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


# -- the two metrics ------------------------------------------------------------------------------
def relation_metric(feat_t: Tensor, feat_s: Tensor) -> Tensor:
    """M_r (SP, Tung & Mori 2019; DisWOT Eq. 6): F ∈ R^{B×D} per network (maps flattened per sample),
    G = F Fᵀ, rows L2-normalised (eps 1e-12), M_r = ‖Ĝ_T − Ĝ_S‖²_F / B². Any widths/resolutions."""
    if feat_t.shape[0] != feat_s.shape[0]:
        raise MethodError(f"relation_metric needs equal batch sizes, got {feat_t.shape[0]} and {feat_s.shape[0]}")
    b = feat_t.shape[0]
    ft, fs = feat_t.reshape(b, -1).float(), feat_s.reshape(b, -1).float()
    gt = F.normalize(ft @ ft.t(), p=2, dim=1, eps=1e-12)
    gs = F.normalize(fs @ fs.t(), p=2, dim=1, eps=1e-12)
    return (gt - gs).pow(2).sum() / (b * b)


def semantic_metric(grad_t: Tensor, grad_s: Tensor, mode: str = "channel") -> Tensor:
    """M_s (ICKD's inter-channel kernel on ∂CE/∂W_fc; DisWOT Eq. 4), gradients of shape (K, C).

    `channel` (official): per class k, G_k = g_k g_kᵀ (C × C), rows L2-normalised,
    M_s = Σ_k ‖Ĝ_k^T − Ĝ_k^S‖²_F / (K·C); equals 2 − (2/(K·C)) Σ_k ⟨sign g_k^T, sign g_k^S⟩ cos(g_k^T, g_k^S)
    for rows without zeros. Requires C_T = C_S.
    `gram` (distillbench deviation, for unequal widths): H = g gᵀ (K × K), rows L2-normalised,
    M_s' = ‖Ĥ_T − Ĥ_S‖²_F / K².
    """
    if grad_t.ndim != 2 or grad_s.ndim != 2 or grad_t.shape[0] != grad_s.shape[0]:
        raise MethodError(
            f"semantic_metric needs (K, C) gradients with equal K, got {tuple(grad_t.shape)}, {tuple(grad_s.shape)}"
        )
    gt, gs = grad_t.float(), grad_s.float()
    k = gt.shape[0]
    if mode == "gram":
        ht = F.normalize(gt @ gt.t(), p=2, dim=1, eps=1e-12)
        hs = F.normalize(gs @ gs.t(), p=2, dim=1, eps=1e-12)
        return (ht - hs).pow(2).sum() / (k * k)
    if mode != "channel":
        raise MethodError(f"semantic_metric mode must be 'channel' or 'gram', got {mode!r}")
    if gt.shape[1] != gs.shape[1]:
        raise MethodError(
            f"the channel semantic metric compares classifier channels one to one: C_T = {gt.shape[1]} ≠ "
            f"C_S = {gs.shape[1]}; use semantic='gram' (a flagged deviation) for unequal widths"
        )
    c = gt.shape[1]
    kt = F.normalize(gt[:, :, None] * gt[:, None, :], p=2, dim=2, eps=1e-12)
    ks = F.normalize(gs[:, :, None] * gs[:, None, :], p=2, dim=2, eps=1e-12)
    return (kt - ks).pow(2).sum() / (k * c)


def ickd_loss(feat_t: Tensor, feat_s: Tensor) -> Tensor:
    """DisWOT†'s inter-channel term (ICKD, Liu et al. 2021), reconstructed: per sample the map is
    flattened to (C, HW), G_b = F_b F_bᵀ (C × C), rows L2-normalised, L = Σ_b ‖Ĝ_T,b − Ĝ_S,b‖²_F / (C·B).
    Equal channel counts (the module applies its adapter first); spatial sizes may differ."""
    if feat_t.shape[:2] != feat_s.shape[:2]:
        raise MethodError(f"ickd_loss needs equal (B, C), got {tuple(feat_t.shape)} and {tuple(feat_s.shape)}")
    b, c = feat_t.shape[:2]
    ft, fs = feat_t.reshape(b, c, -1).float(), feat_s.reshape(b, c, -1).float()
    gt = F.normalize(ft @ ft.transpose(1, 2), p=2, dim=2, eps=1e-12)
    gs = F.normalize(fs @ fs.transpose(1, 2), p=2, dim=2, eps=1e-12)
    return (gt - gs).pow(2).sum() / (c * b)


# -- initialisation and probes --------------------------------------------------------------------
def gaussian_init(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """DisWOT's init: Conv2d/Linear weights ~ N(0, 1) (unit variance, not Kaiming), biases 0, norm
    layers weight 1 and bias 0."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                m.weight.normal_(0.0, 1.0, generator=generator)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, _NORMS):
                if getattr(m, "weight", None) is not None:
                    m.weight.fill_(1.0)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
    return model


@dataclass
class Probe:
    """What DisWOT reads from one network: the pre-pool map and the classifier-weight gradient (K, C)."""

    feat: Tensor
    fc_grad: Tensor


def _classifier_weight(model: nn.Module) -> nn.Parameter:
    fc = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(fc, nn.Linear):
        raise MethodError(f"{type(model).__name__} has no Linear classifier (get_classifier()): DisWOT needs one")
    return fc.weight


def _probe_all(models: Sequence[nn.Module], images: Tensor, labels: Tensor) -> list[Probe]:
    """Forward every network in train mode, one backward of Σ CE, read each classifier gradient.

    Only ∂CE/∂W_fc is needed, and it depends on the trunk only through the pooled features, so the
    trunk runs without autograd (same value, a fraction of the cost)."""
    saved = []
    for m in models:
        w = _classifier_weight(m)
        saved.append((m.training, w.requires_grad))
        m.train()
        m.zero_grad(set_to_none=True)
        w.requires_grad_(True)
    try:
        feats, loss = [], 0.0
        for m in models:
            with torch.no_grad():
                feat = m.forward_features(images)
            feats.append(feat)
            loss = loss + F.cross_entropy(m.forward_head(feat).float(), labels)
        loss.backward()
        return [
            Probe(feat.detach(), _classifier_weight(m).grad.detach().clone())
            for m, feat in zip(models, feats, strict=True)
        ]
    finally:
        for m, (training, req) in zip(models, saved, strict=True):
            m.zero_grad(set_to_none=True)
            _classifier_weight(m).requires_grad_(req)
            m.train(training)


def probe(model: nn.Module, images: Tensor, labels: Tensor) -> Probe:
    """The probe of one already-initialised network (train-mode BN; its BN running stats move)."""
    return _probe_all([model], images, labels)[0]


def score_probes(
    probe_t: Probe, probe_s: Probe, terms: Sequence[str] = ("semantic", "relation"), semantic: str = "channel"
) -> dict[str, float]:
    """M_s, M_r and score = −(sum of the chosen terms), unweighted (spec §1)."""
    unknown = set(terms) - {"semantic", "relation"}
    if unknown or not terms:
        raise MethodError(f"terms must be a non-empty subset of ('semantic', 'relation'), got {tuple(terms)}")
    m_s = float(semantic_metric(probe_t.fc_grad, probe_s.fc_grad, mode=semantic))
    m_r = float(relation_metric(probe_t.feat, probe_s.feat))
    total = (m_s if "semantic" in terms else 0.0) + (m_r if "relation" in terms else 0.0)
    return {"M_s": m_s, "M_r": m_r, "score": -total}


def diswot_score(
    teacher: nn.Module,
    student: nn.Module,
    images: Tensor,
    labels: Tensor,
    terms: Sequence[str] = ("semantic", "relation"),
    semantic: str = "channel",
) -> float:
    """−(M_s + M_r) for two already-initialised networks: both in train mode, both networks' gradients
    cleared before one backward of CE_T + CE_S, flags restored afterwards. BN running statistics are
    updated: score throwaway copies."""
    probe_t, probe_s = _probe_all([teacher, student], images, labels)
    return score_probes(probe_t, probe_s, terms, semantic)["score"]


# -- search spaces ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchSpace:
    """A product of axes; `name_of(genes)` gives the zoo name of one candidate."""

    name: str
    axes: tuple[tuple[Any, ...], ...]
    name_of: Callable[[tuple], str]
    rank_subset: tuple[tuple[Any, ...], ...] | None = None  # axes of the rank-study subset

    def genes(self, subset: bool = False) -> list[tuple]:
        return list(product(*(self.rank_subset if subset and self.rank_subset else self.axes)))

    def names(self, subset: bool = False) -> list[str]:
        return [self.name_of(g) for g in self.genes(subset)]

    def mutate(self, genes: tuple, rng: random.Random) -> tuple:
        """Change one position to a different value of its axis."""
        choices = [i for i, axis in enumerate(self.axes) if len(axis) > 1]
        i = rng.choice(choices)
        new = rng.choice([v for v in self.axes[i] if v != genes[i]])
        return (*genes[:i], new, *genes[i + 1 :])


def _depth_name(g: tuple) -> str:
    return "resnet_depth_" + "".join(str(d) for d in g[:3]) + (g[3] if len(g) > 3 else "")


SPACES: dict[str, SearchSpace] = {
    # DisWOT's S1: the 64 CIFAR ResNets with (d1, d2, d3) ∈ {1, 3, 5, 7}³ (official mutable_depth_resnet20)
    "cifar-resnet-depth": SearchSpace("cifar-resnet-depth", ((1, 3, 5, 7),) * 3, _depth_name),
    # distillbench's small space: depths {1, 2, 3}³ × width {1.0, 0.5} of the stem and first two stages
    "small-resnet-depth-width": SearchSpace(
        "small-resnet-depth-width",
        ((1, 2, 3),) * 3 + (("", "_w50"),),
        _depth_name,
        rank_subset=((1, 3),) * 3 + (("", "_w50"),),
    ),
}


def get_space(name: str) -> SearchSpace:
    try:
        return SPACES[name]
    except KeyError:
        raise MethodError(f"unknown search space {name!r}; known: {', '.join(sorted(SPACES))}") from None


def search_space(name: str, subset: bool = False) -> list[str]:
    """Zoo names of a space (lexicographic); `subset=True` gives its rank-study subset."""
    return get_space(name).names(subset)


def default_space(protocol_name: str) -> str:
    return "cifar-resnet-depth" if protocol_name.startswith("cifar100") else "small-resnet-depth-width"


# -- regularized (aging) evolution ----------------------------------------------------------------
@dataclass
class EvolutionResult:
    best: Hashable
    best_score: float
    history: list[tuple[Hashable, float]] = field(default_factory=list)
    initial: list[Hashable] = field(default_factory=list)


def aging_evolution(
    space: Sequence[Hashable],
    mutate: Callable[[Hashable, random.Random], Hashable],
    score_fn: Callable[[Hashable], float],
    population: int,
    sample: int,
    evaluations: int,
    rng: random.Random,
    budget: Callable[[Hashable], bool] | None = None,
    max_mutation_tries: int = 50,
) -> EvolutionResult:
    """Regularized evolution (Real et al. 2019), as the official NB201 searcher intends, fixed:

    an initial population of `population` *distinct* random candidates within the budget; each cycle
    samples `sample` members, takes the best-scoring as parent, mutates it (within budget), scores the
    child (cached per candidate), appends it and removes the oldest; stops after `evaluations`
    candidates were scored (initial ones included); returns the argmax score over the whole history.
    Never consults ground truth.
    """
    allowed = [c for c in space if budget is None or budget(c)]
    if not allowed:
        raise MethodError("no candidate of the search space is within the budget")
    if population < 1 or sample < 1 or evaluations < 1:
        raise MethodError("population, sample and evaluations must be ≥ 1")
    cache: dict[Hashable, float] = {}

    def score(c: Hashable) -> float:
        if c not in cache:
            cache[c] = float(score_fn(c))
        return cache[c]

    initial = rng.sample(allowed, min(population, len(allowed)))
    pop = [(c, score(c)) for c in initial]
    history = list(pop)
    cycles = 0
    while len(history) < evaluations and cycles < 20 * evaluations:
        cycles += 1
        members = rng.sample(pop, min(sample, len(pop)))
        parent = max(members, key=lambda m: m[1])[0]
        child = None
        for _ in range(max_mutation_tries):
            cand = mutate(parent, rng)
            if budget is None or budget(cand):
                child = cand
                break
        if child is None:  # no neighbour of this parent within budget found: try another cycle
            continue
        pop.append((child, score(child)))
        history.append(pop[-1])
        pop.pop(0)
    best, best_score = max(history, key=lambda m: m[1])
    return EvolutionResult(best, best_score, history, initial)


# -- the search stage -------------------------------------------------------------------------------
def _seed_for(*parts: Any) -> int:
    return zlib.crc32(json.dumps(parts).encode()) & 0x7FFFFFFF


def scoring_batch(datamodule: Any, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """`size` labelled training images drawn with `seed` (the same batch for every candidate)."""
    datamodule.setup()
    ds = datamodule.train_set
    if size > len(ds):
        raise MethodError(f"scoring batch {size} exceeds the {len(ds)} training images")
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(_seed_for("batch", seed)))[:size]
    batch = ds.__getitems__(idx.tolist())
    return batch["image"], batch["label"]


class Scorer:
    """Scores candidates by zoo name against a Gaussian teacher, caching the teacher probe per seed.

    Seeds change the batch and every initialisation; a candidate's initialisation depends only on
    (seed, name), so scores do not depend on the order candidates are visited.
    """

    def __init__(
        self,
        build_model: Callable[[str], nn.Module],
        teacher_arch: str,
        batches: Sequence[tuple[Tensor, Tensor]],
        seeds: Sequence[int],
        terms: Sequence[str] = ("semantic", "relation"),
        semantic: str = "channel",
    ):
        self.build_model, self.terms, self.semantic = build_model, tuple(terms), semantic
        self.batches, self.seeds = list(batches), list(seeds)
        self.teacher_probes = []
        for seed, (x, y) in zip(self.seeds, self.batches, strict=True):
            gen = torch.Generator().manual_seed(_seed_for("teacher", seed, teacher_arch))
            self.teacher_probes.append(probe(gaussian_init(build_model(teacher_arch), gen), x, y))
        self.results: dict[str, dict[str, Any]] = {}

    def __call__(self, name: str) -> float:
        if name not in self.results:
            rows = []
            for seed, (x, y), pt in zip(self.seeds, self.batches, self.teacher_probes, strict=True):
                gen = torch.Generator().manual_seed(_seed_for("student", seed, name))
                ps = probe(gaussian_init(self.build_model(name), gen), x, y)
                rows.append(score_probes(pt, ps, self.terms, self.semantic))
            self.results[name] = {
                "score": sum(r["score"] for r in rows) / len(rows),
                "M_s": sum(r["M_s"] for r in rows) / len(rows),
                "M_r": sum(r["M_r"] for r in rows) / len(rows),
                "per_seed": rows,
            }
        return self.results[name]["score"]


def run_search(
    *,
    space_name: str,
    teacher_arch: str,
    build_model: Callable[[str], nn.Module],
    datamodule: Any,
    seed: int,
    hparams: Mapping[str, Any],
    count_flops: Callable[[nn.Module], int | None] | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Score the space (exhaustively if ≤ 64 candidates, else aging evolution) within the budget and
    return the search record: every scored candidate, its params/FLOPs and the chosen architecture."""
    space = get_space(space_name)
    start = time.perf_counter()
    costs: dict[str, dict[str, int | None]] = {}

    def cost(name: str) -> dict[str, int | None]:
        if name not in costs:
            model = build_model(name)
            costs[name] = {
                "params": sum(p.numel() for p in model.parameters()),
                "flops": count_flops(model) if count_flops and hparams.get("max_flops") else None,
            }
        return costs[name]

    def within(genes: tuple) -> bool:
        c = cost(space.name_of(genes))
        if hparams.get("max_params") and c["params"] > float(hparams["max_params"]):
            return False
        return not (hparams.get("max_flops") and c["flops"] is not None and c["flops"] > float(hparams["max_flops"]))

    seeds = [seed * 1000 + i for i in range(int(hparams.get("num_seeds", 1)))]
    batches = [scoring_batch(datamodule, int(hparams.get("score_batch", 64)), s) for s in seeds]
    scorer = Scorer(
        build_model,
        teacher_arch,
        batches,
        seeds,
        hparams.get("terms", ("semantic", "relation")),
        hparams.get("semantic", "channel"),
    )
    all_genes = space.genes()
    if len(all_genes) <= 64:
        allowed = [g for g in all_genes if within(g)]
        if not allowed:
            raise MethodError(f"no candidate of {space_name!r} is within the budget")
        for i, g in enumerate(allowed):
            scorer(space.name_of(g))
            if (i + 1) % 16 == 0:
                say(f"scored {i + 1}/{len(allowed)} candidates")
        strategy = "exhaustive"
    else:
        aging_evolution(
            all_genes,
            space.mutate,
            lambda g: scorer(space.name_of(g)),
            population=int(hparams.get("population", 16)),
            sample=int(hparams.get("sample", 4)),
            evaluations=int(hparams.get("evaluations", 64)),
            rng=random.Random(seed),
            budget=within,
        )
        strategy = "aging_evolution"
    ranked = sorted(scorer.results, key=lambda n: scorer.results[n]["score"], reverse=True)
    for name in ranked:
        cost(name)
        if count_flops and costs[name]["flops"] is None:
            costs[name]["flops"] = count_flops(build_model(name))
    return {
        "method": "diswot",
        "space": space_name,
        "strategy": strategy,
        "teacher": teacher_arch,
        "teacher_init": "gaussian",
        "seeds": seeds,
        "score_batch": int(hparams.get("score_batch", 64)),
        "terms": list(scorer.terms),
        "semantic": scorer.semantic,
        "budget": {"max_params": hparams.get("max_params"), "max_flops": hparams.get("max_flops")},
        "chosen": ranked[0],
        "search_time_s": round(time.perf_counter() - start, 3),
        "candidates": [{"name": n, **costs[n], **scorer.results[n]} for n in ranked],
    }


def _search_stage(ctx: StageContext) -> dict[str, Any]:
    if ctx.build_model is None:
        raise MethodError("the DisWOT search stage needs the runner's build_model callable")
    hp = ctx.hparams
    teacher_arch = hp.get("search_teacher") or ctx.teacher_info.get("arch")
    if not teacher_arch:
        raise MethodError("DisWOT search needs a teacher architecture (the pair's teacher or search_teacher)")
    record = run_search(
        space_name=hp.get("space") or default_space(ctx.protocol["name"]),
        teacher_arch=teacher_arch,
        build_model=ctx.build_model,
        datamodule=ctx.datamodule,
        seed=ctx.seed,
        hparams=hp,
        count_flops=ctx.count_flops,
    )
    path = ctx.work_dir / "search.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    ctx.student, ctx.student_arch = ctx.build_model(record["chosen"]), record["chosen"]
    return {"chosen": record["chosen"], "record": str(path), "search_time_s": record["search_time_s"]}


# -- the distill stage (the LightningModule) -----------------------------------------------------
DEFAULTS = {
    "temperature": 4.0,
    "ce_weight": 0.1,
    "kd_weight": 0.9,
    "distill": "kd",  # or "kd+diswot": the reconstructed DisWOT† distiller
    "lambda_s": 1.0,
    "lambda_r": 3000.0,
    "space": None,  # default: cifar-resnet-depth on cifar100*, small-resnet-depth-width otherwise
    "search_teacher": None,  # default: the pair's teacher architecture (Gaussian-initialised)
    "num_seeds": 1,
    "score_batch": 64,
    "terms": ["semantic", "relation"],
    "semantic": "channel",
    "max_params": None,
    "max_flops": None,
    "population": 16,
    "sample": 4,
    "evaluations": 64,
}


@register("diswot", defaults=DEFAULTS, stages=(Stage("search", _search_stage),))
class DisWOT(DistillModule):
    """DisWOT: training-free student search (−(M_s + M_r)), then KD of the chosen student; distill='kd+diswot'
    adds the RECONSTRUCTED DisWOT† terms λ_s·ICKD + λ_r·SP on the last-stage maps."""

    def __init__(self, student: nn.Module, teacher=None, **kwargs):
        super().__init__(student, teacher, **kwargs)
        if self.hp.distill not in ("kd", "kd+diswot"):
            raise MethodError(f"diswot: distill must be 'kd' or 'kd+diswot', got {self.hp.distill!r}")
        self.adapter: nn.Module | None = None
        if self.hp.distill == "kd+diswot":
            c_s, c_t = student.num_features, teacher.model.num_features
            if c_s != c_t:  # ICKD compares channels one to one: a trainable 1×1 conv + BN adapter
                self.adapter = nn.Sequential(nn.Conv2d(c_s, c_t, 1, bias=False), nn.BatchNorm2d(c_t))

    def losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        x, y = batch["image"], batch["label"]
        hp = self.hp
        if hp.distill == "kd":
            logits_s, logits_t = self.student(x), self.teacher.logits(x)
        else:
            feat_s = self.student.forward_features(x)
            logits_s = self.student.forward_head(feat_s)
            feat_t, logits_t = self.teacher.run(lambda m, v: (f := m.forward_features(v), m.forward_head(f)), x)
        out = {
            "ce": hp.ce_weight * self.classification_loss(logits_s, y),
            "kd": hp.kd_weight * kd_loss(logits_s, logits_t, hp.temperature),
        }
        if hp.distill == "kd+diswot":
            mapped = self.adapter(feat_s) if self.adapter is not None else feat_s
            out["ickd"] = hp.lambda_s * ickd_loss(feat_t, mapped)
            out["sp"] = hp.lambda_r * relation_metric(feat_t, feat_s)
        return out
